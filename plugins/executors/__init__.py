"""Built-in kdbench plugins: executors."""
