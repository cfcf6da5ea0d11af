"""Built-in kdbench plugins: prune."""
