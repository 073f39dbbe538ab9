import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from hero_ml.config import (
    SECRET_MASK,
    ConfigError,
    HeroConfig,
    is_service_setting,
    load_config,
    with_overrides,
)


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "hero.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


PAPER_CONFIG = Path(__file__).parents[2] / "configs" / "sd15-paper.yaml"


def test_the_paper_config_follows_the_hero_reference() -> None:
    config = load_config(PAPER_CONFIG)
    s, d, e, g = config.sampling, config.ddpo, config.encoder, config.guidance
    assert config.model.source == "runwayml/stable-diffusion-v1-5" and config.model.dtype == "float16"
    assert (s.images_per_round, s.num_steps, s.eta, s.guidance_scale, s.sub_batch_size) == (
        64,
        50,
        1.0,
        5.0,
        8,
    )
    assert (config.model.lora_rank, d.lr, d.weight_decay, d.max_grad_norm) == (4, 1e-3, 1e-4, 1.0)
    assert (d.clip_range, d.adv_clip_max, d.timesteps_per_trajectory, d.inner_epochs) == (1e-4, 5.0, 5, 1)
    assert (d.train_batch_size, d.gradient_accumulation_steps) == (2, 4)
    assert (e.lr, e.epochs_per_round, e.margin) == (1e-5, 500, 0.5)
    assert (g.best_ratio, g.noise_eps, config.d3po.lr) == (0.5, 0.1, 3e-5)
    # 64 images, batch 2, accumulation 4 -> 8 optimiser steps a round; 512 feedbacks -> 8 rounds.
    assert config.derived() == {
        "rounds": 8,
        "feedbacks_per_round": 64,
        "feedbacks_spent": 512,
        "ddpo_optimizer_steps_per_round": 8,
    }


def test_the_embedded_defaults_differ_from_the_paper_only_where_the_toy_needs_it() -> None:
    defaults, paper = load_config().model_dump(), load_config(PAPER_CONFIG).model_dump()
    changed = {
        f"{section}.{name}"
        for section, fields in paper.items()
        if isinstance(fields, dict)
        for name, value in fields.items()
        if defaults[section][name] != value
    }
    assert changed == {
        "model.source", "model.dtype", "model.device", "model.lora_init", "sampling.prompt",
        "sampling.num_steps", "sampling.sub_batch_size", "encoder.lr", "ddpo.lr", "ddpo.clip_range",
        "ddpo.inner_epochs", "ddpo.train_batch_size", "ddpo.gradient_accumulation_steps", "d3po.lr",
        "simulation.task",
    }  # fmt: skip
    # the same 8 trajectories an optimiser step, 4 passes: 32 steps a round over 8 rounds
    assert load_config().derived()["ddpo_optimizer_steps_per_round"] == 32


def test_every_field_has_a_description() -> None:
    def walk(model: type, prefix: str) -> list[str]:
        missing = []
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                missing += walk(annotation, f"{prefix}{name}.")
            elif not field.description:
                missing.append(prefix + name)
        return missing

    assert walk(HeroConfig, "") == []


def test_yaml_values_load_and_the_environment_overrides_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, {"run_id": "blue-rose", "sampling": {"eta": 0.5, "num_steps": 20}})
    monkeypatch.setenv("HERO_SAMPLING__NUM_STEPS", "30")
    config = load_config(path)
    assert (config.run_id, config.sampling.eta, config.sampling.num_steps) == ("blue-rose", 0.5, 30)


def test_a_bad_yaml_value_fails_with_its_field_path(tmp_path: Path) -> None:
    path = write(tmp_path, {"sampling": {"eta": 0}})
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert str(path) in message
    assert "sampling.eta: Input should be greater than 0 (got 0)" in message


def test_every_problem_is_listed(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        {"sampling": {"num_steps": "many", "etaa": 1}, "ddpo": {"lr": -1}, "label_studio": {"token": "x"}},
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "sampling.num_steps: Input should be a valid integer" in message
    assert "sampling.etaa: Extra inputs are not permitted; did you mean 'eta'?" in message
    fields = "api_key, enabled, project_title_prefix, proxy_images, suggestions, url"
    assert f"label_studio.token: Extra inputs are not permitted; the fields here: {fields}" in message
    assert "ddpo.lr: Input should be greater than 0" in message


def test_seeds_stay_within_what_torch_takes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERO_SAMPLING__SEED", str(2**63))
    with pytest.raises(
        ConfigError, match=r"sampling.seed: Input should be less than or equal to 9223372036854775807"
    ):
        load_config()
    monkeypatch.setenv("HERO_SAMPLING__SEED", str(2**63 - 1))
    assert load_config().sampling.seed == 2**63 - 1


def test_a_bad_environment_value_fails_with_its_field_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERO_MODEL__DTYPE", "float8")
    with pytest.raises(
        ConfigError, match=r"model\.dtype: Input should be 'float32', 'float16' or 'bfloat16'"
    ):
        load_config()


def test_cross_section_constraints_are_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, {"sampling": {"num_steps": 3}})
    with pytest.raises(ConfigError, match=r"timesteps_per_trajectory \(5\) exceeds sampling.num_steps \(3\)"):
        load_config(path)
    path = write(tmp_path, {"method": "d3po", "ddpo": {"target_kl": 0.001}})
    with pytest.raises(ConfigError, match=r"ddpo.target_kl bounds the KL to the sampling policy"):
        load_config(path)
    path = write(tmp_path, {"method": "d3po", "ddpo": {"kl_to_base": 0.5}})
    with pytest.raises(ConfigError, match=r"ddpo.kl_to_base is a DDPO penalty"):
        load_config(path)
    path = write(tmp_path, {"ddpo": {"target_kl": 0}})
    with pytest.raises(ConfigError, match=r"ddpo\.target_kl: Input should be greater than 0"):
        load_config(path)
    # a deadline asking for more labels than a complete round would never close it
    path = write(tmp_path, {"orchestration": {"deadline_min_labels": 2}})
    with pytest.raises(
        ConfigError, match=r"deadline_min_labels \(2\) exceeds feedback.annotators_per_image \(1\)"
    ):
        load_config(path)
    both = {"orchestration": {"deadline_min_labels": 2}, "feedback": {"annotators_per_image": 2}}
    assert load_config(write(tmp_path, both)).orchestration.deadline_min_labels == 2
    # Label Studio takes project titles of 50 characters ('HERO ' + a run_id of 45): said before any work
    monkeypatch.setenv("HERO_LABEL_STUDIO__API_KEY", "k")
    label_studio = {"enabled": True}
    assert load_config(write(tmp_path, {"run_id": "r" * 45, "label_studio": label_studio})).run_id == "r" * 45
    path = write(tmp_path, {"run_id": "r" * 46, "label_studio": label_studio})
    with pytest.raises(
        ConfigError, match=r"project title 'HERO r{46}', 51 characters: Label Studio takes at most 50"
    ):
        load_config(path)


def test_unknown_random_architecture_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"model\.source: .*unknown architecture 'huge'"):
        load_config(write(tmp_path, {"model": {"source": "random:huge"}}))
    monkeypatch.setenv("HERO_MODEL__SOURCE", "random:huge")  # named where it came from, not the file
    with pytest.raises(ConfigError, match=r"model\.source: .*'huge'.*\[set by HERO_MODEL__SOURCE\]"):
        load_config(write(tmp_path, {}))


def test_a_secret_in_a_config_file_is_refused_naming_its_variable(tmp_path: Path) -> None:
    # a file is copied, committed and shown; the value is not repeated in the error
    for section, field, variable in [
        ("label_studio", "api_key", "HERO_LABEL_STUDIO__API_KEY"),
        ("storage", "s3_secret_access_key", "HERO_STORAGE__S3_SECRET_ACCESS_KEY"),
        ("orchestration", "webhook_secret", "HERO_ORCHESTRATION__WEBHOOK_SECRET"),
    ]:
        with pytest.raises(ConfigError) as refused:
            load_config(write(tmp_path, {section: {field: "filetokenSECRET"}}))
        assert f"{section}.{field} is a secret: set it in the environment ({variable})" in str(refused.value)
        assert "filetokenSECRET" not in str(refused.value)
    assert load_config(write(tmp_path, {"label_studio": {"api_key": None}})).label_studio.api_key is None


def test_section_requirements_say_which_variable_to_set(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"storage: .*needs s3_bucket \(HERO_STORAGE__S3_BUCKET\)"):
        load_config(write(tmp_path, {"storage": {"backend": "s3"}}))


def test_invalid_yaml_and_non_mapping_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(write(tmp_path, "sampling: [unclosed"))
    with pytest.raises(ConfigError, match="must hold a mapping of sections"):
        load_config(write(tmp_path, "- a\n- b\n"))
    (tmp_path / "latin1.yaml").write_bytes("sampling: {prompt: caf\xe9}".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml is not UTF-8 text \(invalid continuation byte"):
        load_config(tmp_path / "latin1.yaml")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    for key in ("1", "true", "null"):  # YAML's number, bool and None: no setting's name
        with pytest.raises(ConfigError, match=r"hero.yaml: .* is not a setting's name: the top level holds"):
            load_config(write(tmp_path, f"{key}: 2\n"))


def test_a_config_file_named_by_the_environment_is_said_to_be(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HERO_CONFIG_FILE", str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match=r"missing.yaml: No such file .*\(named by HERO_CONFIG_FILE\)"):
        load_config()
    monkeypatch.setenv("HERO_CONFIG_FILE", str(write(tmp_path, {"sampling": {"eta": 3}})))
    with pytest.raises(ConfigError, match=r"in .*hero.yaml \(named by HERO_CONFIG_FILE\):\n  sampling.eta"):
        load_config()


def test_a_value_refused_by_a_pattern_is_told_what_the_field_takes(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"run_id: String should match .* \(got '\.\./x'\): Names the run .*1 to 64"
    ):
        load_config(write(tmp_path, {"run_id": "../x"}))
    with pytest.raises(ConfigError, match=r"model.device: .* \(got 'tpu'\): Torch device .*'cuda:1', 'mps'"):
        load_config(write(tmp_path, {"model": {"device": "tpu"}}))


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_no_setting_takes_an_infinity_or_a_nan(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match=r"ddpo.lr: Input should be a finite number"):
        load_config(write(tmp_path, f"ddpo: {{lr: {value}}}\n"))


def test_secrets_are_masked_in_dumps_and_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERO_LABEL_STUDIO__API_KEY", "tok-very-secret")
    config = load_config(write(tmp_path, {"label_studio": {"enabled": True}}))
    assert config.label_studio.api_key is not None
    assert config.label_studio.api_key.get_secret_value() == "tok-very-secret"
    assert "tok-very-secret" not in str(config.to_public_dict())
    assert "tok-very-secret" not in repr(config)

    bad = write(tmp_path, {"storage": {"s3_secret_access_key": ["not", "a", "string", "s3cr3t"]}})
    with pytest.raises(ConfigError) as caught:
        load_config(bad)
    message = str(caught.value)
    assert "storage.s3_secret_access_key" in message and "s3cr3t" not in message


def test_an_error_about_a_whole_section_or_the_config_repeats_no_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HERO_LABEL_STUDIO__API_KEY", "LSKEY-SECRET")
    monkeypatch.setenv("HERO_STORAGE__S3_ACCESS_KEY_ID", "AKIA-SECRET")
    monkeypatch.setenv("HERO_STORAGE__S3_SECRET_ACCESS_KEY", "S3-SECRET")
    across = write(tmp_path, {"sampling": {"num_steps": 2}, "ddpo": {"timesteps_per_trajectory": 5}})
    with pytest.raises(ConfigError) as caught:
        load_config(across)  # the top level's check, across sections
    assert "(top level): ddpo.timesteps_per_trajectory (5)" in str(caught.value)
    monkeypatch.setenv("HERO_STORAGE__BACKEND", "s3")  # and no bucket: the section's own check
    with pytest.raises(ConfigError) as section:
        load_config()
    assert "storage: backend 's3' needs s3_bucket" in str(section.value)
    for message in (str(caught.value), str(section.value)):
        assert "SECRET" not in message and "got {" not in message


def test_empty_secrets_and_credentials_in_urls_are_refused_without_repeating_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # an empty webhook secret would let every request in: an empty header matches it
    monkeypatch.setenv("HERO_ORCHESTRATION__WEBHOOK_SECRET", "")
    with pytest.raises(
        ConfigError, match=r"orchestration\.webhook_secret: is empty: give it a value, or unset"
    ):
        load_config()
    monkeypatch.delenv("HERO_ORCHESTRATION__WEBHOOK_SECRET")
    for section, field in [
        ("label_studio", "url"),
        ("orchestration", "webhook_url"),
        ("storage", "s3_endpoint_url"),
    ]:
        with pytest.raises(ConfigError) as caught:
            load_config(write(tmp_path, {section: {field: "http://admin:hunter2@host.example:8080/"}}))
        assert f"{section}.{field}: holds credentials" in str(caught.value) and "hunter2" not in str(
            caught.value
        )


@pytest.mark.parametrize(
    ("section", "field", "url"),
    [
        ("tracking", "tracking_uri", "postgresql://hero:Pa/ss#w0rd@db/mlflow"),  # SQLAlchemy's password
        ("label_studio", "url", "http://admin:12/hunter2@ls.example"),  # to urlsplit: host admin, port 12
        ("tracking", "tracking_uri", "http://mlflow-token/x@mlflow.example"),  # a token as the user
        # quotes and whitespace, which end a URL in text, are a password's characters in a setting
        ("tracking", "tracking_uri", "http://alice:Pa'ss@mlflow:5000"),
        ("tracking", "tracking_uri", 'http://alice:Pa"ss@mlflow:5000'),
        ("tracking", "tracking_uri", "http://alice:Pa ss@mlflow:5000"),
        ("label_studio", "url", "https://admin:Pa'ss@ls.example.com/"),
        ("storage", "s3_endpoint_url", "http://minio:Pa'ss@minio:9000/"),
        ("orchestration", "webhook_url", "http://hook:Pa'ss@receiver:8000/"),
    ],
)
def test_credentials_holding_url_delimiters_are_refused_without_repeating_them(
    tmp_path: Path, section: str, field: str, url: str
) -> None:
    with pytest.raises(ConfigError, match=rf"{section}\.{field}: holds credentials") as caught:
        load_config(write(tmp_path, {section: {field: url}}))
    assert "Pa/ss" not in str(caught.value) and "hunter2" not in str(caught.value)
    assert "ss@" not in str(caught.value)
    assert "mlflow-token" not in str(caught.value)


def test_the_mask_a_stored_config_shows_is_no_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # MLflow's config/config.json holds the masks: rerun as it is, the webhook secret would be public
    stored = HeroConfig(orchestration={"webhook_secret": "a-real-secret-0123"}).to_public_dict()
    assert stored["orchestration"]["webhook_secret"] == SECRET_MASK
    with pytest.raises(ConfigError, match=r"orchestration\.webhook_secret: is the mask a stored config"):
        load_config(write(tmp_path, {"orchestration": stored["orchestration"]}))
    monkeypatch.setenv("HERO_LABEL_STUDIO__API_KEY", SECRET_MASK)
    with pytest.raises(ConfigError, match=r"label_studio\.api_key: is the mask .*\[set by HERO_LABEL_"):
        load_config()


@pytest.mark.parametrize("secret", ["x9q", "fifteen-chars-x", " padded-secret-0123", "with-ümlaut-0123"])
def test_a_webhook_secret_must_travel_as_a_header_and_be_hard_to_guess(
    secret: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HERO_ORCHESTRATION__WEBHOOK_SECRET", secret)
    with pytest.raises(ConfigError) as caught:
        load_config()
    assert "orchestration.webhook_secret: must be at least 16 printable ASCII characters" in str(caught.value)
    assert secret.strip() not in str(caught.value)
    monkeypatch.setenv("HERO_ORCHESTRATION__WEBHOOK_SECRET", "sixteen-chars-xy")
    assert load_config().orchestration.webhook_secret is not None


def test_a_local_root_no_file_system_takes_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"storage.local_root: holds a NUL character: name"):
        load_config(write(tmp_path, {"storage": {"local_root": "hero\x00data"}}))  # YAML's "\0"


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path: Path) -> None:
    # plain YAML keeps the last: the first model section would be dropped unseen
    with pytest.raises(ConfigError, match=r"is not valid YAML: 'model' is given twice \(first on line 1\)"):
        load_config(write(tmp_path, "model:\n  source: toy\nsampling:\n  eta: 1.0\nmodel:\n  seed: 1\n"))
    with pytest.raises(ConfigError, match=r"'eta' is given twice \(first on line 2\)\n  in .*, line 3"):
        load_config(write(tmp_path, "sampling:\n  eta: 1.0\n  eta: 0.5\n"))
    merged = load_config(write(tmp_path, "sampling:\n  <<: {eta: 0.5, num_steps: 30}\n  eta: 0.75\n"))
    assert (merged.sampling.eta, merged.sampling.num_steps) == (0.75, 30)  # a merge key may be overridden


def test_a_setting_named_in_upper_case_is_refused(tmp_path: Path) -> None:
    # pydantic-settings takes names whatever their case: an upper-case section slipped past the check
    # for secrets in files, and beside its lower-case twin one of the two was dropped unseen
    for text in (
        "LABEL_STUDIO:\n  api_key: a-token-in-a-file\n",
        "storage:\n  local_root: a\nStorage:\n  local_root: b\n",
        "RUN_ID: upper\n",
    ):
        with pytest.raises(
            ConfigError, match=r"settings' names are lower case: write (label_studio|storage|run_id)$"
        ):
            load_config(write(tmp_path, text))
    assert load_config(write(tmp_path, "run_id: lower\n")).run_id == "lower"


def test_a_huge_refused_value_is_shown_cut(tmp_path: Path) -> None:
    # 4 levels of YAML aliases: a 200-byte file whose prompt is a list of 4**4 strings
    bomb = 'a: &a ["xxxxxxxxxxxxxxxx", "yyyyyyyyyyyyyyyy"]\nb: &b [*a, *a, *a, *a]\nc: &c [*b, *b, *b, *b]\n'
    bomb += "d: &d [*c, *c, *c, *c]\nsampling:\n  prompt: *d\n"
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, bomb))
    (line,) = [line for line in str(caught.value).splitlines() if "sampling.prompt" in line]
    assert line.startswith("  sampling.prompt: Input should be a valid string (got [[[")
    assert len(line) < 200


def test_secret_query_parameters_in_urls_are_refused_without_repeating_them(tmp_path: Path) -> None:
    for section, field, url in [
        ("label_studio", "url", "http://ls.example:8080/?token=tok-hunter2"),
        ("storage", "s3_endpoint_url", "http://s3.example/?X-Api-Key=hunter2"),
        ("tracking", "tracking_uri", "postgresql://hero@db/mlflow?sslmode=require&password=hunter2"),
    ]:
        with pytest.raises(ConfigError, match=rf"{section}\.{field}: holds credentials") as caught:
            load_config(write(tmp_path, {section: {field: url}}))
        assert "hunter2" not in str(caught.value)
        # the advice itself survives the redaction of every message line (no ?password= in its words)
        assert "such as password or token): remove them from the UR" in str(caught.value)
    fine = "postgresql://hero@db/mlflow?sslmode=require&sslkey=/etc/hero/client.key"  # a path, no secret
    assert HeroConfig(tracking={"tracking_uri": fine}).tracking.tracking_uri == fine


@pytest.mark.parametrize(
    ("section", "field", "url"),
    [
        ("label_studio", "url", "http://user:hunter2@host:99999"),  # a bad port
        ("storage", "s3_endpoint_url", "ftp://user:hunter2@host"),  # a bad scheme
        ("tracking", "tracking_uri", "http://user:hunter2@[::1"),  # does not parse
        ("orchestration", "webhook_url", "http://host:99999/?token=hunter2"),
        ("label_studio", "url", 'http://user:hun"ter2@host:99999'),  # a quote in the password
        ("label_studio", "url", "http://user:hun ter2@host:99999"),  # a space: the value is not shown
    ],
)
def test_a_url_refused_for_another_reason_is_shown_without_its_credentials(
    tmp_path: Path, section: str, field: str, url: str
) -> None:
    with pytest.raises(ConfigError, match=rf"{section}\.{field}: ") as caught:
        load_config(write(tmp_path, {section: {field: url}}))
    assert "hunter2" not in str(caught.value) and "ter2" not in str(caught.value)


def test_null_in_an_environment_variable_unsets_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERO_SIMULATION__TASK", "null")  # it read as a task named 'null'
    monkeypatch.setenv("HERO_ORCHESTRATION__ROUND_DEADLINE_H", "null")  # it was not a number
    config = load_config()
    assert config.simulation.task is None and config.orchestration.round_deadline_h is None


def test_mlflow_tracks_beside_the_runs_unless_told_otherwise(tmp_path: Path) -> None:
    # a local_root set alone left mlflow.db in the current folder: promote from elsewhere found none
    assert HeroConfig().tracking.tracking_uri == "sqlite:///hero-data/mlflow.db"
    moved = load_config(write(tmp_path, {"storage": {"local_root": "/srv/hero"}}))
    assert moved.tracking.tracking_uri == "sqlite:////srv/hero/mlflow.db"
    given = {"storage": {"local_root": "/srv/hero"}, "tracking": {"tracking_uri": "http://mlflow:5000"}}
    assert load_config(write(tmp_path, given)).tracking.tracking_uri == "http://mlflow:5000"
    # derived, it follows an override of local_root (an override keeps every value it is not given)
    from hero_ml.config import with_overrides

    again = with_overrides(moved, {"storage": {"local_root": "/srv/other"}})
    assert again.tracking.tracking_uri == "sqlite:////srv/other/mlflow.db"
    kept = with_overrides(load_config(write(tmp_path, given)), {"storage": {"local_root": "/srv/other"}})
    assert kept.tracking.tracking_uri == "http://mlflow:5000"
    with pytest.raises(ConfigError, match=r"storage.local_root holds '\?' or '#'"):
        load_config(write(tmp_path, {"storage": {"local_root": "/srv/run #1"}}))


def test_a_tracking_uri_of_no_mlflow_scheme_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"tracking\.tracking_uri: scheme 'htp' is not one MLflow"):
        load_config(write(tmp_path, {"tracking": {"tracking_uri": "htp://mlflow.internal"}}))
    for uri in [
        "sqlite:///runs/mlflow.db",
        "postgresql+psycopg2://hero@db/mlflow",
        "http://127.0.0.1:5000",
    ]:
        assert HeroConfig(tracking={"tracking_uri": uri}).tracking.tracking_uri == uri
    for folder in ("mlruns", "file:///srv/mlruns"):  # MLflow's file store refuses to open now
        with pytest.raises(
            ConfigError, match=r"is not one MLflow keeps runs under: .*file store, a folder, is retired"
        ):
            load_config(write(tmp_path, {"tracking": {"tracking_uri": folder}}))


def test_one_setting_given_in_two_cases_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # pydantic-settings reads names whatever their case: which one won would hang on the environment's order
    monkeypatch.setenv("HERO_SAMPLING__NUM_STEPS", "3")
    monkeypatch.setenv("hero_sampling__num_steps", "5")
    with pytest.raises(
        ConfigError,
        match=r"environment variables HERO_SAMPLING__NUM_STEPS and hero_sampling__num_steps set the same",
    ):
        load_config()
    monkeypatch.delenv("HERO_SAMPLING__NUM_STEPS")
    assert load_config().sampling.num_steps == 5


def test_environment_variables_of_no_section_or_broken_json_are_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HERO_SAMPLNG__ETA", "0.5")  # would be ignored: a typo
    with pytest.raises(
        ConfigError, match="environment variable HERO_SAMPLNG__ETA: 'samplng' is not a config section"
    ):
        load_config()
    monkeypatch.delenv("HERO_SAMPLNG__ETA")
    for typo, meant in (
        ("HERO_RUNID", "HERO_RUN_ID"),
        ("HERO_METOD", "HERO_METHOD"),
        ("HERO_TRACKNG", "HERO_TRACKING"),
        ("hero_runid", "HERO_RUN_ID"),  # read whatever its case, so checked whatever its case
    ):
        monkeypatch.setenv(typo, "x")
        with pytest.raises(
            ConfigError, match=f"environment variable {typo} is not a setting: did you mean {meant}"
        ):
            load_config()
        monkeypatch.delenv(typo)
    for one_underscore, meant in (
        ("HERO_FEEDBACK_BUDGET", "HERO_FEEDBACK__BUDGET"),
        ("HERO_SAMPLING_IMAGES_PER_ROUND", "HERO_SAMPLING__IMAGES_PER_ROUND"),
        ("HERO_STORAGE_S3_SECRET_ACCESS_KEY", "HERO_STORAGE__S3_SECRET_ACCESS_KEY"),
        ("HERO_ENCODER_LR", "HERO_ENCODER__LR"),  # close to HERO_ENCODER, which it does not mean
        ("HERO_SAMPLING_ETA", "HERO_SAMPLING__ETA"),
    ):
        monkeypatch.setenv(one_underscore, "64")
        with pytest.raises(ConfigError, match=f"{one_underscore} is not a setting: .* did you mean {meant}?"):
            load_config()
        monkeypatch.delenv(one_underscore)
    # the infra scripts' own variables, close to a setting's name as some are, and names far from any
    for other in ("HERO_LABEL_STUDIO_PORT", "HERO_LABEL_STUDIO_VENV", "HERO_S3_PORT", "HERO_HOME"):
        monkeypatch.setenv(other, "1")
    assert load_config().run_id == HeroConfig().run_id
    monkeypatch.setenv("HERO_SAMPLING", "{not json")
    with pytest.raises(
        ConfigError, match=r"invalid configuration in the environment: .*sampling.* takes a JSON"
    ):
        load_config()


def test_a_tracking_uri_with_a_password_is_refused_without_repeating_it(tmp_path: Path) -> None:
    # the URI is published (MLflow params, the stored config): its password would be too
    uri = "postgresql://hero:pw-hunter2@db.internal/mlflow"
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, {"tracking": {"tracking_uri": uri}}))
    message = str(caught.value)
    assert "tracking.tracking_uri: holds credentials" in message and "PGPASSWORD" in message
    assert "hunter2" not in message
    with pytest.raises(ValidationError) as raw:  # pydantic's own text, for callers of HeroConfig(...)
        HeroConfig(tracking={"tracking_uri": uri})
    assert "hunter2" not in str(raw.value)
    user_only = "postgresql://hero@db.internal/mlflow"  # the password from PGPASSWORD / ~/.pgpass
    assert HeroConfig(tracking={"tracking_uri": user_only}).tracking.tracking_uri == user_only
    for token_as_user in ("https://tok-hunter2@mlflow.example", "bogus://tok-hunter2@host"):
        with pytest.raises(ConfigError, match=r"holds credentials.*MLFLOW_TRACKING_TOKEN") as caught:
            load_config(write(tmp_path, {"tracking": {"tracking_uri": token_as_user}}))
        assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize(
    "given", [{"label_studio": "tok-hunter2"}, {"label_studio": ["tok-hunter2"]}, ["tok-hunter2"]]
)
def test_a_value_given_in_place_of_a_section_is_not_repeated(tmp_path: Path, given: object) -> None:
    # a section may hold secrets: a value in its place may be one (a key pasted at the wrong level)
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, given))
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize(("section", "got"), [(5, "a value of type int"), (None, "nothing")])
def test_a_file_section_that_is_no_mapping_is_refused_even_where_the_environment_sets_one_of_its_fields(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, section: object, got: str
) -> None:
    # the environment's HERO_SAMPLING__ETA would otherwise replace the file's broken section unseen
    path = write(tmp_path, {"sampling": section})
    for environment in ({}, {"HERO_SAMPLING__ETA": "0.7"}):
        with monkeypatch.context() as patched:
            for name, value in environment.items():
                patched.setenv(name, value)
            with pytest.raises(ConfigError, match=rf"{path}: section sampling: takes a mapping .* got {got}"):
                load_config(path)


def test_a_section_set_wrongly_by_the_environment_is_not_repeated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERO_LABEL_STUDIO", '"tok-hunter2"')
    with pytest.raises(
        ConfigError, match=r"label_studio: Input should be a valid dictionary.*\[set by HERO_LABEL_STUDIO\]"
    ) as caught:
        load_config()
    assert "hunter2" not in str(caught.value)


def test_enabled_label_studio_needs_a_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs api_key"):
        load_config(write(tmp_path, {"label_studio": {"enabled": True}}))


def test_a_device_torch_would_not_parse_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERO_MODEL__DEVICE", "gpu0")
    with pytest.raises(ConfigError, match=r"model\.device: String should match pattern"):
        load_config()


def test_defaults_are_the_embedded_ones_and_the_default_prompt_is_the_default_tasks() -> None:
    from hero_ml.toy.task import load_task

    config = load_config()
    assert (config.method, config.model.source, config.d3po.beta, config.d3po.clip_eps) == (
        "hero",
        "toy",
        0.1,
        0.1,
    )
    assert config.sampling.prompt in load_task(config.simulation.task).prompts


def test_several_annotators_multiply_the_feedback_a_round_costs(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, {"feedback": {"annotators_per_image": 3, "budget": 576}}))
    assert (config.feedbacks_per_round, config.rounds, config.budget_problem()) == (192, 3, None)
    # 512 is 2 rounds and 128 feedbacks no round spends: a new run says so (a stored one resumes)
    uneven = load_config(write(tmp_path, {"feedback": {"annotators_per_image": 3, "budget": 512}}))
    assert uneven.budget_problem() == (
        "feedback.budget (512) is 2 rounds of 192 feedbacks (sampling.images_per_round x "
        "feedback.annotators_per_image) and 128 more, which no round spends: give 384 or 576"
    )
    with pytest.raises(ConfigError, match="smaller than one round"):
        load_config(write(tmp_path, {"feedback": {"annotators_per_image": 9, "budget": 512}}))


def test_overrides_beat_the_environment_and_are_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    from hero_ml.config import with_overrides

    monkeypatch.setenv("HERO_METHOD", "d3po")
    config = load_config()
    assert config.method == "d3po"
    overridden = with_overrides(config, {"method": "hero", "feedback": {"budget": 128}})
    assert (overridden.method, overridden.feedback.budget, overridden.feedback.annotators_per_image) == (
        "hero",
        128,
        1,
    )
    with pytest.raises(ConfigError, match="method"):
        with_overrides(config, {"method": "magic"})


def test_overrides_name_what_is_wrong_and_refuse_secrets() -> None:
    # deployment parameters are outside input, and Prefect stores them in plain text
    from hero_ml.config import with_overrides

    config = load_config()
    with pytest.raises(ConfigError, match="override 'sampling ': no such setting"):
        with_overrides(config, {"sampling ": {"seed": 1}})
    with pytest.raises(
        ConfigError, match="override 'feedback': a section takes a mapping of its fields, got a int"
    ):
        with_overrides(config, {"feedback": 3})
    with pytest.raises(ConfigError, match=r"sampling\.promt"):
        with_overrides(config, {"sampling": {"promt": "a cat"}})
    for not_a_mapping in ('{"run_id": "x"}', ["run_id"]):  # JSON text typed in Prefect's UI, a list
        with pytest.raises(
            ConfigError, match=r"overrides: a mapping of sections and fields is wanted, e\.g\."
        ):
            with_overrides(config, not_a_mapping)  # type: ignore[arg-type]
    for section, name in [("label_studio", "api_key"), ("storage", "s3_secret_access_key")]:
        variable = f"HERO_{section}__{name}".upper()
        with pytest.raises(ConfigError, match=f"{section}.{name}: a secret .* set {variable}") as refused:
            with_overrides(config, {section: {name: "hunter2-secret"}})
        assert "hunter2" not in str(refused.value)


@pytest.mark.parametrize(
    ("section", "field", "value", "expected"),
    [
        ("tracking", "registered_model", "team/hero", "MLflow takes no '/', ':', '@' or quotes"),
        ("tracking", "registered_model", "hero@v1", "MLflow takes no '/', ':', '@' or quotes"),
        ("tracking", "registered_model", "bob's-lora", "MLflow takes no '/', ':', '@' or quotes"),
        ("tracking", "champion_alias", "prod.v1", "an alias is 1 to 255 letters, digits"),
        ("tracking", "champion_alias", "Latest", "'latest' and v<number> are MLflow's own"),
        ("tracking", "champion_alias", "v3", "'latest' and v<number> are MLflow's own"),
        ("storage", "s3_region", "us east 1", "a region is lower case letters, digits and '-'"),
    ],
)
def test_names_a_service_would_refuse_only_later_are_refused_at_load(
    section: str, field: str, value: str, expected: str
) -> None:
    # a bad registry name would fail only when a finished run registers its LoRA; a bad region when
    # the store opens, as botocore's traceback
    with pytest.raises(ConfigError, match=rf"{section}\.{field}: {re.escape(expected)}"):
        with_overrides(HeroConfig(), {section: {field: value}})
    fine = {"registered_model": "Team Hero.lora", "champion_alias": "prod_v1-b", "s3_region": "eu-west-2"}
    assert (
        getattr(with_overrides(HeroConfig(), {section: {field: fine[field]}}), section).model_dump()[field]
        == fine[field]
    )


def test_a_stored_config_comes_back_with_todays_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    from hero_ml.config import restore_config

    monkeypatch.setenv("HERO_ORCHESTRATION__WEBHOOK_SECRET", "first-secret-0123")
    stored = load_config().to_public_dict()
    assert "first-secret-0123" not in str(stored)
    monkeypatch.setenv("HERO_ORCHESTRATION__WEBHOOK_SECRET", "rotated-secret-0123")
    restored = restore_config(stored, load_config())
    assert restored.orchestration.webhook_secret is not None
    assert restored.orchestration.webhook_secret.get_secret_value() == "rotated-secret-0123"
    assert restored.to_public_dict() == stored


def test_a_stored_config_keeps_its_values_whatever_the_environment_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a service resuming rounds of many runs has settings of its own: a run keeps those it was started with
    from hero_ml.config import restore_config

    stored = load_config().to_public_dict()
    monkeypatch.setenv("HERO_FEEDBACK__ANNOTATORS_PER_IMAGE", "3")
    monkeypatch.setenv("HERO_ORCHESTRATION__ROUND_DEADLINE_H", "2")
    current = load_config()
    assert current.feedback.annotators_per_image == 3
    restored = restore_config(stored, current)
    assert restored.feedback.annotators_per_image == stored["feedback"]["annotators_per_image"] == 1
    assert restored.to_public_dict() == stored


def test_every_secret_is_a_service_setting_and_every_service_setting_exists() -> None:
    # restore_config takes service settings from the process resuming a run: a secret outside them
    # would come back from the stored config as its mask
    from hero_ml.config import SERVICE_SETTINGS, _secret_fields, is_service_setting

    sections = {name for name, field in HeroConfig.model_fields.items() if name not in ("run_id", "method")}
    secrets = {(section, name) for section in sections for name in _secret_fields(section)}
    assert len(secrets) == 4 and all(is_service_setting(*secret) for secret in secrets)
    for setting in SERVICE_SETTINGS:
        section, _, name = setting.partition(".")
        assert section in sections and (not name or name in type(getattr(HeroConfig(), section)).model_fields)
    assert not is_service_setting("ddpo", "lr") and not is_service_setting("label_studio")


def test_processes_must_share_a_round_and_name_no_single_gpu() -> None:
    with pytest.raises(
        ConfigError,
        match=r"images_per_round \(64\) is not a multiple of model.processes \(3\).*set images_per_round to "
        r"a multiple of 3 \(e.g. 66\), or processes to a divisor of 64 \(e.g. 2\)",
    ):
        with_overrides(HeroConfig(), {"model": {"processes": 3}})
    with pytest.raises(
        ConfigError, match=r"model.device 'cuda:1' with model.processes 2.*CUDA_VISIBLE_DEVICES"
    ):
        with_overrides(HeroConfig(), {"model": {"processes": 2, "device": "cuda:1"}})
    assert HeroConfig(model={"processes": 2, "device": "cuda"}).model.processes == 2
    assert is_service_setting("model", "processes")  # a resume may run on another number of GPUs


def test_a_config_without_secrets_keeps_everything_else(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERO_LABEL_STUDIO__API_KEY", "ls-key-0123456789")
    monkeypatch.setenv("HERO_ORCHESTRATION__WEBHOOK_SECRET", "w" * 20)
    config = HeroConfig()
    bare = config.without_secrets()
    assert bare.label_studio.api_key is None and bare.orchestration.webhook_secret is None
    assert config.label_studio.api_key is not None  # the original keeps its own
    assert bare.to_file_dict() == config.to_file_dict()  # a file's view: secrets null, the rest alike
