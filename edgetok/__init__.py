"""edgetok: the device half of a large AI model, as an IoT gateway agent."""

__version__ = "0.1.0"
