"""Built-in ``arith`` reward env: exact-match scoring of the tiny arithmetic task."""
