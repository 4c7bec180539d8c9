CREATE TABLE IF NOT EXISTS kine (
  id BIGINT UNSIGNED AUTO_INCREMENT,
  name VARCHAR(630) CHARACTER SET ascii,
  created INTEGER,
  deleted INTEGER,
  create_revision BIGINT UNSIGNED,
  prev_revision BIGINT UNSIGNED,
  lease INTEGER,
  value MEDIUMBLOB,
  old_value MEDIUMBLOB,
  PRIMARY KEY (id)
);
CREATE INDEX kine_name_index ON kine (name);
CREATE INDEX kine_name_id_index ON kine (name, id);
CREATE INDEX kine_id_deleted_index ON kine (id, deleted);
CREATE INDEX kine_prev_revision_index ON kine (prev_revision);
CREATE UNIQUE INDEX kine_name_prev_revision_uindex ON kine (name, prev_revision);
