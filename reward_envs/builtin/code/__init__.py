"""Built-in ``code`` reward env: model-written Python run against test cases in a sandbox."""
