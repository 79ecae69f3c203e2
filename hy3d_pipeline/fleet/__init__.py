"""Past one process: the Dagster instance for a fleet (Postgres storage, long-lived Celery GPU workers, run
monitoring and retries) and the checks that keep a dead run from blocking the pipeline."""
