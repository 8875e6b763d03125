-- The random id of the agent process that last checked in for a runner. When a
-- new process checks in (another id) the runner's api_key is replaced, so a key
-- captured before (e.g. by squatting the runner's port during an agent
-- restart) stops working as soon as the real agent is back.
ALTER TABLE runners ADD COLUMN agent_instance TEXT;
