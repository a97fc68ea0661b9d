"""Gateway daemon: ingest, windows, journal, head runtime, uplink, results, HTTP."""
