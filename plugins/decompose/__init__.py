"""Built-in kdbench plugins: decompose."""
