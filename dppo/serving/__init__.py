"""Policy serving: a WebSocket + MessagePack policy server, its client library and a robot client.

``codec``, ``protocol``, ``client`` and ``robot`` need only numpy, msgpack and websockets (no
torch), so a robot can run them without the training stack. ``server``, ``robot_sim`` and
``bench`` run on the policy side. The wire protocol is specified in docs/PROTOCOL.md.
"""
