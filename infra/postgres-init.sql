-- One Postgres, a database per service (compose.yaml).
CREATE DATABASE prefect;
CREATE DATABASE mlflow;
CREATE DATABASE labelstudio;
