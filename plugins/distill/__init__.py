"""Built-in kdbench plugins: distill."""
