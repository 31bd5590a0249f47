"""Built-in ``gsm8k`` reward env: exact numeric match of GSM8K-style final answers."""
