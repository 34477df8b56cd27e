"""Redis adapters over txredisapi, shared by the server, the commands and the processor."""
