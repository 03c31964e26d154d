-- Run once by the postgres image on an empty data directory (docker-compose.yml mounts it into
-- /docker-entrypoint-initdb.d/): MLflow's database beside Prefect's (POSTGRES_DB), owned by POSTGRES_USER.
CREATE DATABASE mlflow;
