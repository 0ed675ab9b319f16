"""The node runtime: one mesh node on an asyncio loop, and the parts it is built from.

:mod:`.node` composes them; each part gets the :mod:`.host` and talks to the
others only through the small interfaces of :mod:`.interfaces`:

- :mod:`.host`: the node's request router, procedures and tasks over its transport;
- :mod:`.dht`: Kademlia lookups, replication, expiry and handover;
- :mod:`.services`: advertise, re-advertise, discover, call with selection and failover;
- :mod:`.gateway`: the node side of attached clients;
- :mod:`.inspection`: what a node shows the lab (INSPECT, behind the admin token);
- :mod:`.health`, :mod:`.prometheus`: the HTTP health server and its metrics;
- :mod:`.handlers`: built-in service handlers (calculator, echo, ...).
"""
