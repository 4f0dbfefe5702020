"""Moving bytes: asyncio ZeroMQ transport, CurveZMQ keys, allocator settings. No protocol decisions."""
