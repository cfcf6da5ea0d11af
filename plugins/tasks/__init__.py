"""Built-in kdbench plugins: tasks."""
