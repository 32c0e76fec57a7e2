"""devices.json in both shapes, and every malformed or hostile file refused with a sentence.

The addresses are only parsed: nothing here sends traffic to them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hsmdifd.cluster.devices_file import MAX_FILE_BYTES, MB, load_devices_file
from hsmdifd.daemon.config import ConfigError

# The hsmdif-llama prototype's README, "Create `devices.json` (on Mac Mini)", byte for byte.
PROTOTYPE_DEVICES_JSON = """\
{
  "devices": [
    {
      "address": "192.168.1.10",
      "port": 9999,
      "total_memory": 16000,
      "memfree": 14000,
      "speed": 10.0,
      "load": 0.1
    },
    {
      "address": "10.0.0.1",
      "port": 9999,
      "total_memory": 16000,
      "memfree": 14000,
      "speed": 5.0,
      "load": 0.2
    },
    {
      "address": "10.0.0.2",
      "port": 9999,
      "total_memory": 8000,
      "memfree": 7000,
      "speed": 4.0,
      "load": 0.3
    },
    {
      "address": "10.0.0.3",
      "port": 9999,
      "total_memory": 4000,
      "memfree": 3500,
      "speed": 3.0,
      "load": 0.4
    }
  ]
}
"""

PROTOTYPE_FIGURES = {
    "192.168.1.10:9999": (16000, 14000, 10.0, 0.1),
    "10.0.0.1:9999": (16000, 14000, 5.0, 0.2),
    "10.0.0.2:9999": (8000, 7000, 4.0, 0.3),
    "10.0.0.3:9999": (4000, 3500, 3.0, 0.4),
}


def write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "devices.json"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def refused(path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_devices_file(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message
    return message


def test_the_prototypes_file_as_written(tmp_path: Path) -> None:
    devices = load_devices_file(write(tmp_path, PROTOTYPE_DEVICES_JSON))
    assert list(devices) == list(PROTOTYPE_FIGURES)  # in the file's order
    for address, (total, free, speed, load) in PROTOTYPE_FIGURES.items():
        device = devices[address]
        assert device.address == address and device.declared
        assert device.memory_total_bytes == total * MB
        assert device.memory_usable_bytes == free * MB
        assert (device.speed, device.load) == (speed, load)


def test_the_bare_list_reads_the_same(tmp_path: Path) -> None:
    bare = json.dumps(json.loads(PROTOTYPE_DEVICES_JSON)["devices"])
    as_list = load_devices_file(write(tmp_path, bare))
    assert as_list == load_devices_file(write(tmp_path, PROTOTYPE_DEVICES_JSON))


def test_left_out_figures_and_port_take_their_defaults(tmp_path: Path) -> None:
    devices = load_devices_file(write(tmp_path, '{"devices": [{"address": "kitchen.local"}]}'))
    device = devices["kitchen.local:9999"]
    assert device.memory_total_bytes == 0 and device.speed == 0 and device.declared


def test_an_ipv6_address_becomes_a_bracketed_target(tmp_path: Path) -> None:
    devices = load_devices_file(write(tmp_path, '[{"address": "fe80::1", "port": 9000}]'))
    assert list(devices) == ["[fe80::1]:9000"]


def test_empty_lists_declare_nothing(tmp_path: Path) -> None:
    assert load_devices_file(write(tmp_path, "[]")) == {}
    assert load_devices_file(write(tmp_path, '{"devices": []}')) == {}


ENTRY_PROBLEMS = [
    ("{}", "device 1: needs an 'address'"),
    (
        '{"address": 5}',
        "device 1: 'address' must be a host name or IP address string, not a number",
    ),
    ('{"address": ""}', "device 1: 'address' '' is neither a host name nor an IP address"),
    ('{"address": "bad host"}', "'address' 'bad host' is neither a host name nor an IP"),
    ('{"address": "192.168.1.300"}', "'address' '192.168.1.300' is neither"),
    ('{"address": "10.0.0.1:9999"}', "'address' '10.0.0.1:9999' holds a port; give the port in"),
    ('{"address": "a", "port": 0}', "device 1: 'port' must be a port number from 1 to 65535"),
    ('{"address": "a", "port": 65536}', "'port' must be a port number from 1 to 65535, not 65536"),
    ('{"address": "a", "port": -1}', "'port' must be a port number from 1 to 65535, not -1"),
    ('{"address": "a", "port": "9999"}', "'port' must be a port number from 1 to 65535"),
    ('{"address": "a", "port": 9999.5}', "'port' must be a port number"),
    ('{"address": "a", "port": true}', "'port' must be a port number"),
    ('{"address": "a", "speed": "fast"}', "device 1: 'speed' must be a number >= 0, not a string"),
    ('{"address": "a", "load": null}', "'load' must be a number >= 0, not null"),
    ('{"address": "a", "memfree": [1]}', "'memfree' must be a number >= 0, not a list"),
    ('{"address": "a", "total_memory": true}', "'total_memory' must be a number >= 0"),
    ('{"address": "a", "total_memory": -1}', "'total_memory' must be a finite number >= 0, not -1"),
    ('{"address": "a", "speed": -0.5}', "'speed' must be a finite number >= 0, not -0.5"),
    ('{"address": "a", "speed": 1e400}', "'speed' must be a finite number >= 0, not inf"),
    ('{"address": "a", "load": ' + "9" * 400 + "}", "'load' must be a finite number >= 0"),
    ('{"address": "a", "load": 40}', "'load' must be between 0 and 1 (the fraction of the CPU"),
    ('{"address": "a", "total_memory": 1e12}', "'total_memory' must be at most 1073741824 MB"),
    (
        '{"address": "a", "total_memory": 4000, "memfree": 7000}',
        "'memfree' (7000 MB) is more than 'total_memory' (4000 MB)",
    ),
    ('{"address": "a", "colour": 1}', "device 1: unknown keys colour (known keys: address, port"),
    ('"10.0.0.1"', "device 1: must be an object with an 'address', not a string"),
]


@pytest.mark.parametrize("shape", ["list", "object"])
@pytest.mark.parametrize(("entry", "message"), ENTRY_PROBLEMS)
def test_a_bad_entry_is_named_in_either_shape(
    tmp_path: Path, shape: str, entry: str, message: str
) -> None:
    entries = f'[{{"address": "10.0.0.9"}}, {entry}]'
    text = entries if shape == "list" else f'{{"devices": {entries}}}'
    # The bad entry is the second: the message must say so.
    assert message.replace("device 1", "device 2") in refused(write(tmp_path, text))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "not a readable devices.json"),
        ("[", "not a readable devices.json"),
        ('"devices"', 'must hold a list of devices, or an object with a "devices" list, not a'),
        ("7", 'must hold a list of devices, or an object with a "devices" list'),
        ("{}", 'must hold a list of devices, or an object with a "devices" list; this object'),
        ('{"devices": {"address": "a"}}', '"devices" must hold a list of devices, not an object'),
        ('{"devices": [], "workers": []}', "unknown top-level keys 'workers'; the object holds"),
        ('{"Devices": []}', "unknown top-level keys 'Devices'"),
        ('[{"address": "a", "speed": NaN}]', "NaN is not a figure a device can declare"),
        ('[{"address": "a", "speed": Infinity}]', "Infinity is not a figure a device can"),
        ('[{"address": "a", "load": -Infinity}]', "-Infinity is not a figure a device can"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        (
            '[{"address": "a"}, {"address": "b"}, {"address": "a", "port": 9999}]',
            "device 3: a:9999 is",
        ),
        ('[{"address": "Kitchen"}, {"address": "kitchen"}]', "device 2: kitchen:9999 is already"),
        ('[{"address": "a", "port": 1}, {"address": "a", "port": 2}]', None),
    ],
)
def test_bad_files_are_refused_with_a_sentence(
    tmp_path: Path, text: str, message: str | None
) -> None:
    path = write(tmp_path, text)
    if message is None:  # one host on two ports is two devices
        assert len(load_devices_file(path)) == 2
    else:
        assert message in refused(path)


def test_duplicate_names_both_entries(tmp_path: Path) -> None:
    text = '{"devices": [{"address": "10.0.0.1"}, {"address": "10.0.0.1", "port": 9999}]}'
    message = refused(write(tmp_path, text))
    assert "device 2: 10.0.0.1:9999 is already device 1; list each device once" in message


def test_a_huge_file_is_refused_unread(tmp_path: Path) -> None:
    entry = '{"address": "10.0.0.1"},'
    text = "[" + entry * (MAX_FILE_BYTES // len(entry)) + '{"address": "10.0.0.2"}]'
    assert "the devices file is over 1024 KiB" in refused(write(tmp_path, text))


def test_a_file_at_the_limit_is_read(tmp_path: Path) -> None:
    text = '[{"address": "10.0.0.1"}]'
    path = write(tmp_path, text + " " * (MAX_FILE_BYTES - len(text)))
    assert list(load_devices_file(path)) == ["10.0.0.1:9999"]


def test_missing_unreadable_and_binary_files(tmp_path: Path) -> None:
    assert "no such devices file" in refused(tmp_path / "nowhere.json")
    assert "is a directory" in refused(tmp_path)
    assert "not UTF-8 text" in refused(write(tmp_path, b'[{"address": "\xff"}]'))


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(["10.0.0.1", "kitchen", "fe80::1", "devices", "address", "port"]),
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(
            st.sampled_from(
                ["devices", "address", "port", "total_memory", "memfree", "speed", "load", "x"]
            )
            | st.text(max_size=5),
            inner,
            max_size=6,
        )
    ),
    max_leaves=30,
)


figures = st.floats(0, 1e5) | st.integers(0, 10**5) | st.floats() | st.integers() | st.text()
device_like = st.fixed_dictionaries(
    {"address": st.ip_addresses().map(str) | st.sampled_from(["kitchen.local", "", "a b", "x:1"])},
    optional={
        "port": st.integers(1, 65535) | st.integers() | st.booleans(),
        **{key: figures for key in ("total_memory", "memfree", "speed", "load")},
    },
)
documents = st.lists(device_like, max_size=4) | st.fixed_dictionaries(
    {"devices": st.lists(device_like, max_size=4)}
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(value=json_values | documents)
def test_any_json_value_loads_or_is_refused_naming_the_file(tmp_path: Path, value: Any) -> None:
    path = write(tmp_path, json.dumps(value))
    try:
        devices = load_devices_file(path)
    except ConfigError as e:
        assert str(e).startswith(f"{path}: ")
        return
    for address, device in devices.items():
        assert device.address == address and device.declared
        assert address.rsplit(":", 1)[1].isdigit()
        assert device.memory_usable_bytes >= 0 and device.memory_total_bytes >= 0
        assert device.speed >= 0 and 0 <= device.load <= 1
