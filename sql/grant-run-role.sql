-- synapse-account-data-relay: a role for `run` with only what it uses (generated; the same as
-- `setup --grant-to synapse_relay`, which adapts to what it finds: prefer it). Run after setup.sql,
-- as a superuser (ALTER ROLE ... REPLICATION needs one; the GRANTs need the tables' owner).
-- First: CREATE ROLE synapse_relay LOGIN PASSWORD '...'; and a pg_hba.conf line for it.
-- let "synapse_relay" use the state schema "synapse_account_data_relay"
GRANT USAGE ON SCHEMA "synapse_account_data_relay" TO "synapse_relay";
-- let "synapse_relay" read and write the relay's state tables
GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE "synapse_account_data_relay"."pending_keys", "synapse_account_data_relay"."appservices", "synapse_account_data_relay"."backfills" TO "synapse_relay";
-- let "synapse_relay" use the relay's version sequence
GRANT USAGE ON SEQUENCE "synapse_account_data_relay"."pending_key_version" TO "synapse_relay";
-- let "synapse_relay" read the account-data tables (SELECT only)
GRANT SELECT ON TABLE "account_data", "room_account_data", "room_tags", "room_tags_revisions" TO "synapse_relay";
-- give "synapse_relay" the REPLICATION attribute
ALTER ROLE "synapse_relay" WITH REPLICATION;
