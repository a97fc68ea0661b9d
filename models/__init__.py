"""Bundle format and loader (runtime, no torch); the torch build toolchain lives in `build`."""
