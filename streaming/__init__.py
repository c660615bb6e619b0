"""The wire: Realtime-API protocol (sans-I/O), per-connection sessions, and the WebSocket server."""
