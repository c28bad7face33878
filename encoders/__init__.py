"""encoders: see DESIGN.md; built by later issues."""
