"""Custom UI pieces: the span picker (a gr.HTML component) and the page-level keyboard shortcuts."""
