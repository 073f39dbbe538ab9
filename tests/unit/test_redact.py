"""Credentials out of URLs that are shown: exact outputs on hand-written cases."""

import json

from hero_ml.redact import mask_secrets, redact, secret_query_keys, url_userinfo


def test_userinfo_and_secret_query_values_are_hidden_and_the_rest_is_kept() -> None:
    text = (
        "Client error '401 Unauthorized' for url 'http://admin:hunter2@127.0.0.1:4200/api/health'; "
        "db postgresql+psycopg2://hero@db:5432/mlflow?sslmode=require&password=hunter2#x "
        "and https://ls.example/?page=2&Auth-Token=abc;client_secret=def"
    )
    assert redact(text) == (
        "Client error '401 Unauthorized' for url 'http://…@127.0.0.1:4200/api/health'; "
        "db postgresql+psycopg2://…@db:5432/mlflow?sslmode=require&password=…#x "
        "and https://ls.example/?page=2&Auth-Token=…;client_secret=…"
    )
    plain = "http://127.0.0.1:4200/api?limit=5 and a@b.example"
    assert redact(plain) == plain


def test_a_password_holding_url_delimiters_is_hidden_whole() -> None:
    # SQLAlchemy reads postgresql://hero:Pa/ss#w?0rd@db/mlflow with the password 'Pa/ss#w?0rd'; urlsplit
    # takes the first '/' as the host's end and sees no credentials at all
    uri = "postgresql://hero:Pa/ss#w?0rd@db/mlflow"
    shown = redact(f"error: MLflow at {uri}: no driver")
    assert shown == "error: MLflow at postgresql://…@db/mlflow: no driver"
    assert url_userinfo(uri) == "hero:Pa/ss#w?0rd"
    assert url_userinfo("http://admin:12/ss@ls") == "admin:12/ss"  # a valid URL to urlsplit: host admin
    assert url_userinfo("postgresql://hero@db/mlflow") == "hero"
    assert url_userinfo("http://127.0.0.1:5000/api") is None
    assert url_userinfo("sqlite:///hero-data/mlflow.db") is None
    # a setting's password may hold quotes and spaces; in text, quotes do not end the redaction
    assert url_userinfo("http://alice:s3'c\"r et@mlflow:5000") == "alice:s3'c\"r et"
    assert redact("""(got 'http://user:p"w@host:99999')""") == "(got 'http://…@host:99999')"


def test_secret_query_keys_are_named_by_name_or_ending() -> None:
    url = "https://h/?token=1&sslmode=require&db_password=2&sslkey=/k&apikey=3&X-Api-Key=4&monkey=5"
    assert secret_query_keys(url) == ["token", "db_password", "apikey", "X-Api-Key"]
    signed = "https://b.s3/k.png?X-Amz-Credential=c&X-Amz-Signature=s&sig=a&key=b&auth=c&v=1#access_token=t"
    assert secret_query_keys(signed) == ["X-Amz-Credential", "X-Amz-Signature", "sig", "key", "auth"]
    assert redact(signed) == (
        "https://b.s3/k.png?X-Amz-Credential=…&X-Amz-Signature=…&sig=…&key=…&auth=…&v=1#access_token=…"
    )
    assert secret_query_keys("sqlite:///hero-data/mlflow.db") == []


def test_a_secret_is_masked_in_every_escaping_an_echo_may_carry() -> None:
    secret = 'pa"ss\\wörd?&x'  # a quote, a backslash, a non-ASCII letter, URL-special characters
    body = {"headers": {"X-Hero-Webhook-Secret": secret}}
    echoes = [
        secret,
        str(body),  # a dict body printed: repr doubles the backslash
        json.dumps(body),  # JSON text: the quote and backslash escaped, ö as \u00f6
        json.dumps(body, ensure_ascii=False),
        "url=https://h/?s=pa%22ss%5Cw%C3%B6rd%3F%26x",
        "form=pa%22ss%5Cw%C3%B6rd%3F%26x",
    ]
    masked = [mask_secrets(echo, [secret, ""], "***") for echo in echoes]
    assert masked == [
        "***",
        "{'headers': {'X-Hero-Webhook-Secret': '***'}}",
        '{"headers": {"X-Hero-Webhook-Secret": "***"}}',
        '{"headers": {"X-Hero-Webhook-Secret": "***"}}',
        "url=https://h/?s=***",
        "form=***",
    ]
    assert mask_secrets("nothing to hide", [secret], "***") == "nothing to hide"
