"""Clients of the Stemme server: the device client (`stemme talk`), the browser page, load tests."""
