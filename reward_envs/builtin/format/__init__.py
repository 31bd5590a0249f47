"""Built-in ``format`` reward env: structure checks of tagged completions."""
