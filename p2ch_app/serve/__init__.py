"""nodule-serve: the models over HTTP (the book's chapter-15 /predict, batched; whole CTs as jobs; a page)."""
