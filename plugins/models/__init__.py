"""Built-in kdbench plugins: models."""
