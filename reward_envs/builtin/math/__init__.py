"""Built-in ``math`` reward env: final-answer equivalence through math-verify."""
