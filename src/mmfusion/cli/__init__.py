"""The `mmfusion` command line (thin: it parses configs and calls the layers below)."""
