"""Reports of a run: tables (rich and JSON), the Markdown / HTML document, and its figures."""
