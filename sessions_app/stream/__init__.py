"""The stream: topics, the table, the agent, the pipeline (the unit of work) and its services."""
