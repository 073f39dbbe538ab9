"""Hostile and malformed input from outside: for each kind, a corpus of known tricks and random cases
(hypothesis). Each gets an error of its own kind that says what is wrong, never a crash of another
kind, and nothing is written, queued or executed because of it. Counts of cases: docs/RELIABILITY.md.
"""

import hashlib
import json
import os
import pickle
import re
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import event as event_tally
from hypothesis import strategies as st
from pydantic import SecretStr

from flows.webhooks import create_app
from hero_ml.adapters.label_studio.rounds import collect
from hero_ml.adapters.storage import LocalStore
from hero_ml.adapters.storage.keys import InvalidKeyError, check_key
from hero_ml.config import ConfigError, HeroConfig, load_config
from hero_ml.diffusion.sampler import Trajectory
from hero_ml.engine import STATE, TENSORS, Engine, EngineError
from tests.conftest import serve
from tests.unit.test_engine import run_rounds, small_config

EXAMPLES = 200
SECRET = "hostile-input-secret-0123456789"
HEADER = "X-Hero-Webhook-Secret"
quick = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=24,
)

# -- storage keys ----------------------------------------------------------------------------------

KEY_TRICKS = [
    "",
    "/etc/passwd",
    "../outside",
    "runs/../../outside",
    "runs/./a",
    "runs//a",
    "runs/a/",
    ".hidden",
    "runs/.git/config",
    "runs\\..\\outside",
    "C:\\Windows",
    "~/.ssh/id_rsa",
    "%2e%2e/outside",
    "runs/a\x00b",
    "runs/a\nb",
    "runs/a\n",  # a trailing newline ($ matches before one: a prefix from an env file)
    "runs/a\n/b",
    " runs",
    "\uff0e\uff0e/outside",  # fullwidth dots
    "runs/\u202egnp.exe",  # right-to-left override
    "r\u0075\u0308ns",  # combining diaeresis
    "runs/\u2024\u2024/x",  # one-dot leaders
    "file:///etc/passwd",
    "s3://other-bucket/key",
]


def test_key_tricks_are_refused_and_nothing_is_written(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "root")
    for key in KEY_TRICKS:
        with pytest.raises(InvalidKeyError, match="not a plain relative path"):
            store.put(key, b"x")
        with pytest.raises(InvalidKeyError):
            store.get(key)
    assert not (tmp_path / "root").exists() or not any((tmp_path / "root").rglob("*"))


@quick
@given(st.text(max_size=60))
def test_a_key_is_refused_or_stays_inside_the_root(key: str) -> None:
    root = Path("/srv/hero-store")
    try:
        check_key(key)
    except InvalidKeyError:
        return
    assert key.isascii() and (root / key).resolve().is_relative_to(root)


# -- webhook requests ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def receiver() -> Any:
    calls: list[tuple[str, str, int]] = []

    def check(flow_run_id: str, run_id: str, round_index: int) -> Any:
        calls.append((flow_run_id, run_id, round_index))

    server = serve(create_app(check, SecretStr(SECRET), max_body_bytes=4096, rejection_burst=10**9))
    url = next(server)  # uvicorn on loopback
    try:
        yield url, calls
    finally:
        server.close()


def post(url: str, body: bytes, secret: str | None = SECRET) -> requests.Response:
    headers = {"Content-Type": "application/json"} | ({HEADER: secret} if secret is not None else {})
    return requests.post(f"{url}/webhooks/label-studio", data=body, headers=headers, timeout=10)


@settings(quick, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(body=json_values)
def test_any_json_body_is_accepted_or_refused_never_a_server_error(receiver: Any, body: Any) -> None:
    client, _ = receiver
    assert post(client, json.dumps(body).encode()).status_code in (202, 400, 413)


@settings(quick, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=6000))
def test_any_bytes_are_refused_as_malformed_or_oversized(receiver: Any, body: bytes) -> None:
    client, _ = receiver
    answer = post(client, body)
    assert answer.status_code in (202, 400, 413)
    if len(body) > 4096:
        assert answer.status_code == 413


RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
hero_meta = st.fixed_dictionaries(
    {},
    optional={  # well-formed values mixed in, so that both answers are reached (tallied below)
        "run_id": st.from_regex(RUN_ID, fullmatch=True) | st.text(max_size=70) | json_values,
        "round": st.integers(-5, 10**12) | json_values,
        "flow_run_id": st.uuids().map(str) | st.text(max_size=40) | st.none(),
        "kind": st.sampled_from(["image", "best", "other"]),
    },
)
well_formed_meta = st.fixed_dictionaries(
    {
        "run_id": st.from_regex(RUN_ID, fullmatch=True),
        "round": st.integers(0, 10**12),
        "flow_run_id": st.uuids().map(str),
    }
)
# well-formed, forged, and well-formed with some fields forged
any_meta = (
    well_formed_meta | hero_meta | st.tuples(well_formed_meta, hero_meta).map(lambda two: two[0] | two[1])
)
ACTIONS = [
    "ANNOTATION_CREATED",
    "ANNOTATIONS_CREATED",
    "ANNOTATION_UPDATED",
    "TASK_DELETED",
    "PROJECT_UPDATED",
]


def names_a_waiting_round(meta: dict, action: str) -> bool:
    """What the receiver must queue, said apart from its pydantic model: an annotation of a task whose
    metadata names a run id (the storage key rule), a round (a JSON number >= 0) and a flow run (a UUID)."""
    run_id, round_index, flow_run_id = meta.get("run_id"), meta.get("round"), meta.get("flow_run_id")
    return (
        action.startswith("ANNOTATION")
        and isinstance(run_id, str)
        and RUN_ID.fullmatch(run_id) is not None
        and type(round_index) is int
        and round_index >= 0
        and isinstance(flow_run_id, str)
        and re.fullmatch(r"[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}", flow_run_id) is not None
    )


@settings(quick, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(meta=any_meta, action=st.sampled_from(ACTIONS))
def test_events_with_forged_metadata_queue_exactly_the_well_formed_rounds(
    receiver: Any, meta: dict, action: str
) -> None:
    client, _ = receiver
    event = {"action": action, "task": {"id": 1, "data": {"hero": meta}}}
    answer = post(client, json.dumps(event).encode())
    assert answer.status_code == 202
    queued = names_a_waiting_round(meta, action)
    event_tally(f"queued: {queued}")  # hypothesis' statistics show both
    assert answer.json() == {"queued": int(queued)}


def test_forged_rounds_are_not_queued(receiver: Any) -> None:
    # the corner cases by hand: a round given as true, as text or as a float is no round
    client, _ = receiver
    well_formed = {"run_id": "run-1", "round": 2, "flow_run_id": "0" * 8 + "-0000-0000-0000-" + "0" * 12}
    for forged in ({"round": True}, {"round": "2"}, {"round": 2.0}, {"round": -1}, {"run_id": "../x"}):
        event = {"action": "ANNOTATION_CREATED", "task": {"data": {"hero": well_formed | forged}}}
        assert post(client, json.dumps(event).encode()).json() == {"queued": 0}, forged
    event = {"action": "ANNOTATION_CREATED", "task": {"data": {"hero": well_formed}}}
    assert post(client, json.dumps(event).encode()).json() == {"queued": 1}


def settled_counts(url: str) -> dict:
    """The receiver's counters once its queued round checks have run (they run on a thread of their
    own, so a check queued by an earlier request may still be running when the next request starts)."""
    for _ in range(500):
        state = requests.get(f"{url}/health", timeout=10).json()
        if state["idle"]:
            return state
        time.sleep(0.01)
    raise AssertionError(f"the receiver's round checks did not settle in 5 s: {state}")


@settings(quick, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(secret=st.text(max_size=80) | st.none())
def test_any_wrong_secret_is_refused(receiver: Any, secret: str | None) -> None:
    client, calls = receiver
    if secret == SECRET:
        return
    # a round the receiver would queue with the right secret (the control at the end shows it does)
    flow_run_id = str(uuid.uuid4())
    event = {"action": "ANNOTATION_CREATED", "task": {"data": {"hero": {"run_id": "a", "round": 0}}}}
    event["task"]["data"]["hero"]["flow_run_id"] = flow_run_id
    body = json.dumps(event).encode()
    before = settled_counts(client)
    try:
        answer = post(client, body, secret=secret)
    except (UnicodeEncodeError, ValueError, requests.exceptions.InvalidHeader):
        return  # not even sendable as an HTTP header (requests and http.client refuse it)
    except (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError):
        assert not str(secret).isprintable()  # uvicorn dropped a malformed header
        answer = None
    if answer is not None:
        # 400: uvicorn refuses a header with control characters before the app sees the request
        refused = answer.status_code == 401 or (answer.status_code == 400 and not str(secret).isprintable())
        assert refused and SECRET not in answer.text
    after = settled_counts(client)
    assert (after["accepted"], after["queued"]) == (before["accepted"], before["queued"])
    assert all(call[0] != flow_run_id for call in calls)
    assert post(client, body).json() == {"queued": 1}  # the control: the right secret queues it
    settled_counts(client)
    assert any(call[0] == flow_run_id for call in calls)


# -- Label Studio annotations ------------------------------------------------------------------------

annotation = st.fixed_dictionaries(
    {},
    optional={
        "id": json_values,
        "completed_by": json_values,
        "was_cancelled": json_values,
        "updated_at": json_values,
        "result": st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "from_name": st.sampled_from(["label", "best", "other"]) | json_values,
                    "type": json_values,
                    "value": json_values
                    | st.fixed_dictionaries(
                        {"choices": st.lists(st.text(max_size=12) | json_values, max_size=3)}
                    ),
                },
            ),
            max_size=3,
        )
        | json_values,
    },
)
task = st.fixed_dictionaries(
    {},
    optional={
        "id": json_values,
        "data": st.fixed_dictionaries({"hero": hero_meta | json_values}) | json_values,
        "annotations": st.lists(annotation, max_size=4) | json_values,
    },
)


ROUND_IMAGES = ["r0000-000", "r0000-001"]
CHOICES = ["good", "bad", "keep", *ROUND_IMAGES]
# well-formed tasks and annotations, mostly of this round, so that the mapping is reached (the junk is
# `task`'s): this round's images, an image the round does not hold, another round and run, best tasks
mapped_meta = st.fixed_dictionaries(
    {
        "run_id": st.sampled_from(["r", "r", "r", "other"]),
        "round": st.sampled_from([0, 0, 0, 1]),
        "kind": st.sampled_from(["image", "image", "image", "best"]),
        "image_id": st.sampled_from([*ROUND_IMAGES, *ROUND_IMAGES, "r0000-999"]),
    }
)
mapped_annotation = st.fixed_dictionaries(
    {
        "id": st.integers(1, 99),
        "completed_by": st.sampled_from([1, 2]),
        "result": st.lists(
            st.fixed_dictionaries(
                {
                    "from_name": st.sampled_from(["label", "label", "best"]),
                    "type": st.just("choices"),
                    "value": st.fixed_dictionaries(
                        {"choices": st.lists(st.sampled_from(CHOICES), min_size=1, max_size=2)}
                    ),
                }
            ),
            min_size=1,
            max_size=2,
        ),
    },
    optional={"was_cancelled": st.booleans(), "updated_at": st.sampled_from(["2026-01-01", "2026-01-02"])},
)
mapped_task = st.fixed_dictionaries(
    {
        "id": st.integers(1, 99),
        "data": st.fixed_dictionaries({"hero": mapped_meta}),
        "annotations": st.lists(mapped_annotation, min_size=1, max_size=3) | st.lists(annotation, max_size=2),
    }
)


@quick
@given(tasks=st.lists(mapped_task | task, max_size=6))
def test_any_label_studio_export_is_collected_or_reported_never_a_crash(tasks: list) -> None:
    collected = collect(
        tasks,
        run_id="r",
        round_index=0,
        image_ids=ROUND_IMAGES,
        digests={},  # the tasks carry no digest (a release before them): none compared
        has_current_best=False,
        annotators_per_image=1,
    )

    def meta(task: Any) -> dict:
        data = task.get("data") if isinstance(task, dict) else None
        hero = data.get("hero") if isinstance(data, dict) else None
        return hero if isinstance(hero, dict) and type(hero.get("round")) is int else {}

    def of_this_round(task: Any, kind: str) -> bool:
        wanted = {"run_id": "r", "round": 0, "kind": kind}
        return {k: meta(task).get(k) for k in wanted} == wanted

    def chosen(annotation: dict) -> set[str]:
        results = annotation.get("result")
        values = [
            r.get("value") for r in (results if isinstance(results, list) else []) if isinstance(r, dict)
        ]
        lists = [v.get("choices") for v in values if isinstance(v, dict)]
        return {c for choices in lists if isinstance(choices, list) for c in choices if isinstance(c, str)}

    # a label comes from an annotation of this round's task of that image, or of its best task (a best
    # pick says good), by that annotator
    sources = {
        (str(who.get("id") if isinstance(who := a.get("completed_by"), dict) else who), image)
        for t in tasks
        if (of_this_round(t, "image") or of_this_round(t, "best")) and isinstance(t.get("annotations"), list)
        for a in t["annotations"]
        if isinstance(a, dict)
        for image in ({meta(t).get("image_id")} if meta(t)["kind"] == "image" else chosen(a))
    }
    for feedback in collected.feedback:
        for label in feedback.images:
            assert label.image_id in ROUND_IMAGES and (feedback.annotator, label.image_id) in sources
    # a task of this round naming an image the round does not hold is reported, never dropped silently
    for t in tasks:
        if of_this_round(t, "image") and meta(t).get("image_id") == "r0000-999":
            message = f"task {t.get('id')}: image 'r0000-999' is not in round 0"
            assert any(message in problem for problem in collected.problems)


# -- config files ------------------------------------------------------------------------------------


@quick
@given(data=json_values | st.dictionaries(st.sampled_from(list(HeroConfig.model_fields)), json_values))
def test_any_config_file_loads_or_names_its_problem(
    tmp_path_factory: pytest.TempPathFactory, data: Any
) -> None:
    path = tmp_path_factory.mktemp("config") / "hero.yaml"
    path.write_text(yaml.safe_dump(data))
    try:
        load_config(path)
    except ConfigError as err:
        assert str(path) in str(err)


# -- checkpoints and trajectories --------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    from hero_ml.diffusion.pipeline import build_random_pipeline

    root = tmp_path_factory.mktemp("checkpoint")
    engine = Engine(small_config(), build_random_pipeline("tiny", seed=0))
    run_rounds(engine, 1)  # optimiser moments, a best and good noises to be checked
    engine.save(LocalStore(root), "ck")
    return (root / "ck" / TENSORS).read_bytes(), (root / "ck" / STATE).read_bytes()


def load(tmp: Path, tensors: bytes, state: bytes, pipe: Any = None) -> None:
    """Load a checkpoint of these bytes; without `pipe`, one refused before the model is needed."""
    store = LocalStore(tmp)
    store.put(f"ck/{TENSORS}", tensors)
    store.put(f"ck/{STATE}", state)
    Engine.load(small_config(), pipe, store, "ck")


@settings(quick, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, 10**6), flip=st.integers(0, 10**6))
def test_a_truncated_or_tampered_checkpoint_is_refused(
    checkpoint: tuple[bytes, bytes], tmp_path_factory: pytest.TempPathFactory, cut: int, flip: int
) -> None:
    tensors, state = checkpoint
    tmp = tmp_path_factory.mktemp("tampered")
    truncated = tensors[: cut % len(tensors)]
    with pytest.raises(EngineError, match="changed or truncated"):
        load(tmp, truncated, state)
    at = flip % len(tensors)
    tampered = tensors[:at] + bytes([tensors[at] ^ 0x01]) + tensors[at + 1 :]
    with pytest.raises(EngineError, match="changed or truncated"):
        load(tmp, tampered, state)


@settings(quick, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(state=json_values)
def test_a_forged_state_file_is_refused(
    checkpoint: tuple[bytes, bytes], tmp_path_factory: pytest.TempPathFactory, state: Any
) -> None:
    with pytest.raises(EngineError, match=r"checkpoint 'ck' has format .*, expected"):
        load(tmp_path_factory.mktemp("forged"), checkpoint[0], json.dumps(state).encode())


class Payload:
    """Unpickling this runs a command: what a pickle-based checkpoint would let a file do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_loading_a_checkpoint_never_executes_what_it_holds(
    checkpoint: tuple[bytes, bytes], tmp_path: Path
) -> None:
    """An attacker who rewrites both files (the tensors as a pickle, state.json with its sha256) gets
    a refusal: checkpoints are safetensors, parsed, never unpickled."""
    marker = tmp_path / "executed"
    blob = pickle.dumps(Payload(marker))
    state = json.loads(checkpoint[1])
    state["tensors"] = {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    with pytest.raises(EngineError, match="not a safetensors file"):
        load(tmp_path / "store", blob, json.dumps(state).encode())
    with pytest.raises(ValueError, match="not a safetensors file"):
        Trajectory.from_bytes(blob)
    assert not marker.exists()


@quick
@given(data=st.binary(max_size=400))
def test_any_bytes_as_a_trajectory_are_refused(data: bytes) -> None:
    with pytest.raises(ValueError):
        Trajectory.from_bytes(data)


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("round", -1, "round: Input should be greater than or equal to 0"),
        ("feedbacks", "64", "feedbacks: Input should be a valid integer"),
        ("replay_rounds", None, "replay_rounds: Input should be a valid integer"),
        ("optimizers", [], "optimizers: Input should be a valid dictionary"),
    ],
)
def test_a_state_file_with_its_tensors_hash_but_bad_fields_names_the_field(
    checkpoint: tuple[bytes, bytes], tmp_path: Path, field: str, value: Any, says: str
) -> None:
    # the hash covers the tensors, not state.json: its fields are checked on their own
    state = {**json.loads(checkpoint[1]), field: value}
    with pytest.raises(EngineError, match="is not a checkpoint's state") as refused:
        load(tmp_path, checkpoint[0], json.dumps(state).encode())
    assert says in str(refused.value)


def test_a_state_file_that_is_not_json_is_named(checkpoint: tuple[bytes, bytes], tmp_path: Path) -> None:
    with pytest.raises(EngineError, match=r"ck/state.json is not JSON: Expecting property name"):
        load(tmp_path, checkpoint[0], b"{not json")


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        (lambda tensors: tensors.pop(next(k for k in tensors if k.startswith("lora."))), "lacks 'lora."),
        (
            lambda tensors: tensors.update({k: v[:1] for k, v in tensors.items() if k.startswith("lora.")}),
            r"does not fit this engine: lora\..* has shape \(1, 32\), this engine.s is \(4, 32\)",
        ),
        (
            lambda tensors: tensors.update({"optim.lora.0.exp_avg": tensors["optim.lora.0.exp_avg"][:1]}),
            r"does not fit this engine: optim.lora exp_avg has shape \(1, 32\), its parameter's is \(4, 32\)",
        ),
        (
            lambda tensors: tensors.update({"best.noise": tensors["best.noise"][:2]}),
            r"does not fit this engine: best.noise has shape \(2, 16, 16\), this engine's is \(4, 16, 16\)",
        ),
        (
            lambda tensors: tensors.update({"best.latent": tensors["best.latent"][None]}),
            r"does not fit this engine: best.latent has shape \(1, 4, 16, 16\), this engine's is \(4, 16,",
        ),
        (
            lambda tensors: tensors.update({"best.image": tensors["best.image"][:, :, :1].contiguous()}),
            r"does not fit this engine: best.image has shape \(32, 32, 1\), this engine's is \(32, 32, 3\)",
        ),
        (
            lambda tensors: tensors.update({"best.image": tensors["best.image"].float()}),
            r"does not fit this engine: best.image is torch.float32, an image's pixels are uint8",
        ),
        (
            lambda tensors: tensors.update({"good_noises": tensors["good_noises"][:, :2].contiguous()}),
            r"does not fit this engine: good_noises has shape \(\d+, 2, 16, 16\), this engine's is \(N, 4,",
        ),
    ],
    ids=[
        "a-tensor-missing",
        "a-tensor-of-another-shape",
        "a-moment-of-another-shape",
        "a-noise-of-another-shape",
        "a-best-latent-of-another-shape",
        "a-best-image-of-another-shape",
        "a-best-image-not-pixels",
        "good-noises-of-another-shape",
    ],
)
def test_a_checkpoint_whose_tensors_do_not_fit_the_model_is_named(
    checkpoint: tuple[bytes, bytes], tmp_path: Path, edit: Any, says: str
) -> None:
    # both files consistent (the hash of the edited tensors recorded): another method's or an edited
    # checkpoint, refused when restored into the model, not half-loaded
    from safetensors.torch import load as load_tensors
    from safetensors.torch import save as save_tensors

    from hero_ml.diffusion.pipeline import build_random_pipeline

    tensors = load_tensors(checkpoint[0])
    edit(tensors)
    blob = save_tensors(tensors)
    state = json.loads(checkpoint[1])
    state["tensors"] = {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    with pytest.raises(EngineError, match=f"checkpoint 'ck' {says}"):
        load(tmp_path, blob, json.dumps(state).encode(), build_random_pipeline("tiny", seed=0))


def test_a_trajectory_whose_tensors_disagree_is_refused_with_the_shapes(tmp_path: Path) -> None:
    from hero_ml.diffusion.pipeline import build_random_pipeline
    from hero_ml.engine import sample_batch

    trajectory = sample_batch(build_random_pipeline("tiny", seed=0), small_config().sampling, 0).trajectory
    assert Trajectory.from_bytes(trajectory.to_bytes()).prompts == trajectory.prompts
    steps = trajectory.num_steps
    short = Trajectory(**{**trajectory.__dict__, "log_probs": trajectory.log_probs[:, :-1]})
    with pytest.raises(ValueError, match=rf"log_probs has shape \(6, {steps - 1}\), expected it to start"):
        Trajectory.from_bytes(short.to_bytes(), source="rounds/0/trajectory.safetensors")
    fewer_prompts = Trajectory(**{**trajectory.__dict__, "prompts": trajectory.prompts[:-1]})
    with pytest.raises(ValueError, match=r"latents has shape \(6,"):
        Trajectory.from_bytes(fewer_prompts.to_bytes())


def test_a_server_echoing_the_refused_request_gets_no_secret_into_the_error() -> None:
    # Real Label Studio does not echo; a proxy or impostor at its URL may, and the webhook's secret
    # and the S3 keys travel in the very requests it refuses.
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from hero_ml.adapters.label_studio.client import LabelStudioError, LabelStudioProjects

    async def echo(request: Request) -> JSONResponse:
        if request.method == "GET":
            return JSONResponse([])  # no webhooks yet: the next call creates one
        headers = dict(request.headers)
        return JSONResponse({"you sent": {"headers": headers, "body": (await request.body()).decode()}}, 400)

    server = serve(Starlette(routes=[Route("/{path:path}", echo, methods=["GET", "POST", "PATCH"])]))
    url = next(server)
    try:
        projects = LabelStudioProjects(url, SecretStr("api-key-0123456789"))
        with pytest.raises(LabelStudioError, match=r"refused to create webhook \(HTTP 400\)") as err:
            projects.ensure_webhook(1, "http://127.0.0.1:1/hook", SecretStr("webhook-secret-777"))
        assert "you sent" in str(err.value)  # the echo is shown, without what it would leak
        assert "webhook-secret-777" not in str(err.value) and "api-key-0123456789" not in str(err.value)
        with pytest.raises(LabelStudioError, match=r"refused to connect S3 storage \(HTTP 400\)") as err:
            projects.connect_s3(
                1,
                bucket="b",
                prefix="p/",
                endpoint_url=None,
                region="us-east-1",
                access_key_id=SecretStr("s3-key-id-4242"),
                secret_access_key=SecretStr("s3-secret-key-5353"),
                presign_ttl_s=3600,
            )
        assert "you sent" in str(err.value)
        assert "s3-key-id-4242" not in str(err.value) and "s3-secret-key-5353" not in str(err.value)
        # the round flow takes the client as a parameter, which Prefect encodes and stores in its
        # database: what it holds encodes as masks (the SDK's client, unencodable today, is not relied on)
        from fastapi.encoders import jsonable_encoder

        from flows.round import hero_round
        from hero_ml.labelling import LabelStudioRounds

        config = HeroConfig(label_studio={"enabled": True, "api_key": "api-key-0123456789"})
        humans = LabelStudioRounds(config, None, projects)  # type: ignore[arg-type]
        encoded = json.dumps(
            [hero_round.serialize_parameters({"humans": humans}), jsonable_encoder(projects._secrets)]
        )
        assert "**********" in encoded
        for secret in ("api-key-0123456789", "webhook-secret-777", "s3-key-id-4242", "s3-secret-key-5353"):
            assert secret not in encoded
    finally:
        server.close()


@pytest.mark.parametrize(
    ("content", "media_type", "answer"),
    [
        ('{"detail": "ok"}', "application/json", "no user id"),  # JSON, but no Label Studio's
        ("<html>a web page</html>", "text/html", "HTTP 200: <html>a web page</html>"),
        # a JSON list where the SDK reads an object: its TypeError named, not raised past the caller
        ("[1, 2]", "application/json", "JSON the SDK cannot read (TypeError: "),
    ],
)
def test_a_server_that_is_not_label_studio_is_named_as_such(
    content: str, media_type: str, answer: str
) -> None:
    # a mistyped URL that reaches some other web server: it answers 200, with something else
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    from hero_ml.adapters.label_studio.client import LabelStudioError, LabelStudioProjects

    async def other(_: object) -> Response:
        return Response(content, media_type=media_type)

    server = serve(Starlette(routes=[Route("/{path:path}", other, methods=["GET", "POST"])]))
    url = next(server)
    try:
        projects = LabelStudioProjects(url, SecretStr("api-key-0123456789"))
        with pytest.raises(LabelStudioError) as err:
            projects.check()
        assert str(err.value).startswith(
            f"the server at {url} is not Label Studio: asked to say who the API key belongs to, "
            f"it answered {answer}"
        )
        assert str(err.value).endswith("; check HERO_LABEL_STUDIO__URL")
        with pytest.raises(
            LabelStudioError, match=r"is not Label Studio: asked to (create project|list projects)"
        ):
            projects.ensure_project("r", 1)  # the project's id was read as int(None) before
    finally:
        server.close()
