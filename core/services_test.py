import socket

from core.services import ephemeral_port_low, free_port, port_open


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range():
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    low = ephemeral_port_low()
    if low > 20_000:
        assert max(ports) < low
    with socket.socket() as s:  # each one binds now
        s.bind(("127.0.0.1", ports[0]))
        s.listen()
        assert port_open("127.0.0.1", ports[0])
