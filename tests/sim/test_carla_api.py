"""The CARLA API the bridge uses, checked against the installed carla 0.9.16 client library.

Three lists must agree: ``CARLA_API_USED`` (declared in sim/carla_world.py), the real ``carla``
module, and the test stand-in (tests/sim/carla_standin.py).

- Every declared name exists in the real module, with the same kind (method versus attribute or
  property) in the stand-in; the stand-in's public surface is exactly the declared names.
- The declared list is complete, as far as a static reading can tell: every ``carla.X`` chain in
  sim/carla_world.py and sim/carla_scenarios.py is declared, and every attribute or method name
  used on any object in those files that is also a member name of some real ``carla`` class is
  declared (or is one of a few names of our own objects listed below). Limits: the check is by
  name, not by type (it cannot tell ``frame.frame`` on a SceneFrame from ``measurement.frame``,
  nor attribute a method to the right class), it does not see names built at run time
  (``getattr`` with a string), nor carla objects handed to code outside these two files.
- Keyword arguments passed to carla callables are declared and exist in the real signatures.
- The bridge's conversions give the same matrices as the real ``carla.Transform.get_matrix``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import carla
import carla_standin
import numpy as np
import pytest

from sim.carla_world import (
    CARLA_API_USED,
    CARLA_KEYWORDS_USED,
    ControlMapping,
    T_actor_from_agent,
    T_from_carla_transform,
    carla_transform_from_T,
    vector_from_carla,
)
from sim.geometry import S_MIRROR_Y, T_from_xyz_rpy
from sim.types import VehicleControl

ROOT = Path(__file__).resolve().parents[2]
BRIDGE_FILES = [ROOT / "sim" / "carla_world.py", ROOT / "sim" / "carla_scenarios.py"]

# Attribute names used in the bridge on objects of our own (numpy arrays, dataclasses, queues,
# dicts) that happen to be member names of some carla class too, with the carla class and where
# the bridge uses them. Anything else that looks like carla must be declared.
OWN_NAMES = {
    "NONE": "Semantic.NONE (carla: LaneType.NONE and other enums)",
    "acceleration": "sim.types.VehicleControl.acceleration (carla: VehicleAckermannControl)",
    "actor": "_Vehicle.actor, our record of a spawned vehicle (carla: CollisionEvent and other events)",
    "append": "list.append (carla: vector_of_* containers)",
    "control": "CarlaWorld.control, the ControlMapping (carla: command.ApplyVehicleControl)",
    "get": "dict.get and queue.Queue.get (carla: TextureColor)",
    "heading": "LaneWalker.heading (carla: RoadMark)",
    "speed": "Placement.speed (carla: VehicleAckermannControl, WalkerControl)",
    "value": "ActorKind.value (carla: Landmark)",
    "waypoint": "Placement.waypoint (carla: Landmark, RoadMark)",
}


def _resolve(module, owner: str):
    obj = module
    for part in filter(None, owner.split(".")):
        obj = getattr(obj, part)
    return obj


def _declared_by_owner() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for owner, name in CARLA_API_USED:
        out.setdefault(owner, set()).add(name)
    return out


def _carla_chain(node: ast.AST) -> list[str] | None:
    """``["Location"]`` for ``carla.Location``, ``["command", "SpawnActor"]`` for
    ``carla.command.SpawnActor``; None when the expression is not rooted at the module (the name
    ``carla`` or the attribute ``self._carla`` that holds it)."""
    parts = []
    while isinstance(node, ast.Attribute):
        if node.attr == "_carla" and isinstance(node.value, ast.Name) and node.value.id == "self":
            return parts[::-1]
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id == "carla":
        return parts[::-1]
    return None


def _bridge_usage() -> tuple[set[tuple[str, str]], set[str], list[tuple[str, str, set[str]]]]:
    """(carla chains as (owner, name) pairs, other attribute names, calls with keywords)."""
    chains: set[tuple[str, str]] = set()
    attributes: set[str] = set()
    keyword_calls: list[tuple[str, str, set[str]]] = []
    for path in BRIDGE_FILES:
        tree = ast.parse(path.read_text())
        in_chain: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                chain = _carla_chain(node)
                if chain:
                    owner = ".".join(chain[:-1])
                    chains.add((owner, chain[-1]))
                    sub = node.value
                    while isinstance(sub, ast.Attribute):
                        in_chain.add(id(sub))
                        sub = sub.value
                    in_chain.add(id(node))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and id(node) not in in_chain:
                attributes.add(node.attr)
            if isinstance(node, ast.Call) and node.keywords and isinstance(node.func, ast.Attribute):
                kws = {k.arg for k in node.keywords if k.arg is not None}
                chain = _carla_chain(node.func)
                if chain:
                    keyword_calls.append((".".join(chain), "__init__", kws))
                else:
                    keyword_calls.append(("", node.func.attr, kws))
    return chains, attributes, keyword_calls


def _carla_member_names() -> set[str]:
    names: set[str] = set()
    for module in (carla, carla.command):
        for top in dir(module):
            obj = getattr(module, top)
            if isinstance(obj, type):
                names |= {n for n in dir(obj) if not n.startswith("_")}
    return names


# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("owner", "name"), CARLA_API_USED)
def test_declared_names_exist_in_the_installed_carla(owner, name):
    assert carla.libcarla is not None  # the compiled client library, not a stub
    real_owner = _resolve(carla, owner)
    assert hasattr(real_owner, name), f"carla{'.' + owner if owner else ''} has no {name!r} in carla 0.9.16"


def test_installed_client_is_0_9_16():
    assert carla.Client("127.0.0.1", 1).get_client_version().startswith("0.9.16")


def test_declared_list_has_no_duplicates_and_every_entry_is_used():
    assert len(set(CARLA_API_USED)) == len(CARLA_API_USED)
    chains, attributes, _ = _bridge_usage()
    chain_names = {name for _, name in chains} | {owner for owner, _ in chains if owner}
    unused = []
    for owner, name in CARLA_API_USED:
        if owner in ("", "command") or owner in {o for o, _ in chains}:
            used = (owner, name) in chains or (owner == "" and name in chain_names)
        else:
            used = name in attributes
        if not used:
            unused.append((owner, name))
    assert unused == [], f"declared but not used by the bridge: {unused}"


def test_every_carla_use_in_the_bridge_is_declared():
    chains, attributes, _ = _bridge_usage()
    declared = set(CARLA_API_USED)
    # carla.X, carla.command.X, carla.Enum.Value
    for owner, name in chains:
        head = owner.split(".")[0] if owner else name
        assert ("", head) in declared, f"carla.{head} is used but not declared"
        assert (owner, name) in declared, f"carla.{owner + '.' if owner else ''}{name} is used but not declared"
    # methods and attributes on carla objects, by name
    declared_names = {name for _, name in CARLA_API_USED}
    carla_names = _carla_member_names()
    undeclared = sorted((attributes & carla_names) - declared_names - set(OWN_NAMES))
    assert undeclared == [], (
        f"the bridge uses {undeclared}, which are carla member names: declare them in CARLA_API_USED "
        "(or, if they belong to our own objects, in OWN_NAMES with where they are used)"
    )
    # OWN_NAMES must stay honest: each is really used and really a carla member name elsewhere
    assert set(OWN_NAMES) <= attributes
    assert set(OWN_NAMES) <= carla_names


def test_keywords_passed_to_carla_exist_in_the_real_signatures():
    _, _, calls = _bridge_usage()
    declared_methods = {name for _, name in CARLA_API_USED}
    by_method: dict[str, set[str]] = {}
    for (owner, method), kws in CARLA_KEYWORDS_USED.items():
        by_method.setdefault(method if method != "__init__" else owner, set()).update(kws)
    for owner, method, kws in calls:
        if method == "__init__":
            key = owner.split(".")[-1]
        elif method in declared_methods:
            key = method
        else:
            continue  # not a carla call (numpy, dataclasses, our own functions)
        assert kws <= by_method.get(key, set()), f"keywords {kws} of {owner or method} are not declared"
    for (owner, method), kws in CARLA_KEYWORDS_USED.items():
        doc = getattr(_resolve(carla, owner), method).__doc__ or ""
        for kw in kws:
            assert f"){kw}=" in doc, f"carla.{owner}.{method} takes no keyword {kw!r}: {doc}"


def test_standin_implements_exactly_the_declared_surface():
    declared = _declared_by_owner()
    # top level: the module's __all__ (less its test controls) is the declared top-level names
    exported = {n for n in carla_standin.__all__ if not n.startswith("standin_")}
    assert exported == declared[""]
    assert {n for n in vars(carla_standin.command) if not n.startswith("_")} == declared["command"] | {"Response"}
    checked = 0
    for owner, names in declared.items():
        if owner in ("", "command"):
            continue
        real_cls, fake_cls = _resolve(carla, owner), _resolve(carla_standin, owner)
        bases = {c.__name__ for c in real_cls.__mro__}
        allowed = set().union(*(declared.get(b, set()) for b in bases), names)
        public = {n for n in dir(fake_cls) if not n.startswith("_")}
        assert names <= public, f"stand-in {owner} lacks {names - public}"
        assert public <= allowed, f"stand-in {owner} has {public - allowed}, which the bridge may not use"
        for name in names:
            real_callable = callable(getattr(real_cls, name))
            fake_callable = callable(getattr(fake_cls, name))
            assert real_callable == fake_callable, f"{owner}.{name}: method in one, attribute in the other"
        checked += 1
    # every other stand-in class only has what it inherits from a declared class (Location from
    # Vector3D, Vehicle from Actor...), or nothing public at all (SpawnActor, DestroyActor)
    owners = {owner.split(".")[-1]: owner for owner in declared}
    for value in [*vars(carla_standin).values(), *vars(carla_standin.command).values()]:
        if isinstance(value, type) and issubclass(value, carla_standin._Strict) and value.__name__ not in owners:
            public = {n for n in dir(value) if not n.startswith("_")}
            inherited = set().union(*(declared.get(c.__name__, set()) for c in value.__mro__[1:]))
            assert public <= inherited, f"stand-in {value.__name__} has undeclared {public - inherited}"
    assert checked > 20


def test_standin_fails_loudly_outside_the_declared_api():
    with pytest.raises(AttributeError, match="CARLA_API_USED"):
        carla_standin.Walker  # noqa: B018
    with pytest.raises(AttributeError, match="CARLA_API_USED"):
        carla_standin.command.ApplyVehicleControl  # noqa: B018
    client = carla_standin.Client("127.0.0.1", 2999)
    with pytest.raises(AttributeError, match="CARLA_API_USED"):
        client.get_available_maps()


# --------------------------------------------------------------------------------------------------
# conversions against the real library's value types
# --------------------------------------------------------------------------------------------------


def test_transforms_match_the_real_carla_matrices():
    rng = np.random.default_rng(0)
    for _ in range(20):
        roll, pitch = rng.uniform(-0.4, 0.4, 2)
        T = T_from_xyz_rpy(*rng.uniform(-200, 200, 3), roll, pitch, rng.uniform(-np.pi, np.pi))
        real = carla_transform_from_T(carla, T)
        assert isinstance(real, carla.Transform)
        M = np.array(real.get_matrix())  # CARLA's own left-handed matrix
        assert np.allclose(S_MIRROR_Y @ M @ S_MIRROR_Y, T, atol=1e-4)
        assert np.allclose(T_from_carla_transform(real), T, atol=1e-4)


def test_carla_yaw_turns_clockwise_and_y_points_right():
    # a CARLA vehicle at yaw 90 degrees faces +y_carla, which is our -y (to the right of +x)
    T = T_from_carla_transform(carla.Transform(carla.Location(x=1.0, y=2.0, z=3.0), carla.Rotation(yaw=90.0)))
    assert np.allclose(T[:3, 3], [1.0, -2.0, 3.0])
    assert np.allclose(T[:3, 0], [0.0, -1.0, 0.0], atol=1e-9)
    assert np.allclose(vector_from_carla(carla.Vector3D(x=0.0, y=5.0, z=0.0)), [0.0, -5.0, 0.0])


def test_agent_frame_from_a_real_bounding_box():
    bbox = carla.BoundingBox(carla.Location(x=0.2, y=0.1, z=0.8), carla.Vector3D(x=2.3, y=0.9, z=0.75))
    T = T_actor_from_agent(bbox)
    # bottom centre = location - extent.z, y mirrored
    assert np.allclose(T[:3, 3], [0.2, -0.1, 0.05])
    assert np.allclose(T[:3, :3], np.eye(3))


def test_control_mapping_builds_real_vehicle_controls():
    mapping = ControlMapping(full_throttle_accel=4.0, full_brake_decel=8.0)
    max_steer = np.radians(70.0)
    c = mapping.to_carla(carla, VehicleControl(acceleration=2.0, steering=0.35), max_steer)
    assert isinstance(c, carla.VehicleControl)
    assert c.throttle == pytest.approx(0.5) and c.brake == 0.0
    assert c.steer == pytest.approx(-0.35 / max_steer, abs=1e-6)  # left in ours = negative in CARLA
    c = mapping.to_carla(carla, VehicleControl(acceleration=-20.0, steering=-5.0), max_steer)
    assert c.throttle == 0.0 and c.brake == pytest.approx(1.0) and c.steer == pytest.approx(1.0)
    assert ControlMapping.steering_from_carla(c.steer, max_steer) == pytest.approx(-max_steer)
    with pytest.raises(ValueError, match="finite"):
        mapping.to_carla(carla, VehicleControl(acceleration=float("nan")), max_steer)
