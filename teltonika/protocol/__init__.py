"""The TCP side of the server: the device Protocol, its Factory and their settings."""
