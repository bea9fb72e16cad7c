"""The nvit latency service: a control plane (``nvit serve``), agents on target devices (``nvit agent``)
and the client the CLI uses for remote tables and remote measurements.

This package sits above everything it uses; nothing in nvit below it imports it. The server side needs the
``service`` extra (FastAPI, uvicorn, SQLAlchemy); the client and the agent need only httpx.
"""
