"""Triggers of the provider (run by Airflow's triggerer while a deferrable task waits)."""
