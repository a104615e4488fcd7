-- Security fix: earlier code granted the server-side `lo_import` (which
-- reads any file of the tenant server: data files of other tenants, the
-- server's own secrets) to tenant roles with the large-object writes. The
-- code now takes it back wherever it grants a database's privileges. Every
-- live tenant database is regranted by the reconciler (a batch per pass,
-- the path that regranted databases of the shared-group era), every spare
-- is replaced, and every template rebuilt.
UPDATE tenants SET own_privileges = false WHERE status IN ('active', 'suspended');
UPDATE spares SET own_privileges = false;
UPDATE db_servers SET template_version = NULL;
