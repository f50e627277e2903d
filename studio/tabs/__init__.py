"""One module per tab: each builds its components, then wires its events in one short function."""
