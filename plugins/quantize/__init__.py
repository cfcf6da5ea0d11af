"""Built-in kdbench plugins: quantize."""
