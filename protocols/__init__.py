"""Pure protocol machines and formats: no sockets, no asyncio, no clocks.

Every machine here takes inputs (messages, the current time as a number) and
returns effects (plain data); the node's runtime performs them.
"""
