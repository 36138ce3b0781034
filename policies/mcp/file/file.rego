# METADATA
# title: File policy
# description: |
#   Rules for the actions file.read, file.write, file.delete and file.list.
#   Paths are relative to the subject's workspace; absolute paths, ".."
#   segments and control characters are denied. A path is allowed when one of
#   the subject's roles grants the operation on a prefix it lies under
#   (data.gateway.roles[_].files) and it is not in a protected location
#   (data.gateway.file.protected, matched at any depth).
package mcp.file

import data.mcp.roles

# METADATA
# title: Operation
# description: The file operation of the action (read, write, delete or list), undefined for other actions.
operation := op if {
	is_string(input.action)
	startswith(input.action, "file.")
	op := substring(input.action, 5, -1)
	op in data.gateway.file.operations
}

# METADATA
# title: Normalised path
# description: The requested path without empty and "." segments ("" is the workspace root).
path := roles.normalise(input.file.path) if is_string(input.file.path)

# METADATA
# title: Granted prefixes
# description: The path prefixes the subject's roles are granted for the operation.
granted_prefixes contains prefix if {
	some r in roles.known
	some prefix in object.get(data.gateway.roles[r], ["files", operation], [])
}

# METADATA
# title: Allow
# description: One of the subject's roles grants the operation on a prefix the path lies under.
default allow := false

allow if {
	some prefix in granted_prefixes
	roles.under(path, prefix)
}

allow if {
	probe
	count(granted_prefixes) > 0
}

# METADATA
# title: Probe
# description: |
#   The input asks whether the subject may perform the operation anywhere in
#   its workspace (input.file.probe is true): allowed when one of its roles
#   grants the operation on any prefix. The gateway asks this to show a
#   subject only the MCP tools it may call; no file is touched on a probe.
probe if input.file.probe == true

# METADATA
# title: Protected locations
# description: |
#   The protected locations (data.gateway.file.protected: ".ssh", ".git/hooks", ...)
#   the path is in or under, at any depth.
protected_locations contains loc if {
	padded := concat("", ["/", path, "/"])
	some loc in data.gateway.file.protected
	contains(padded, concat("", ["/", loc, "/"]))
}

# METADATA
# title: Deny reasons
# description: Human-readable reasons the file operation is denied; empty when it may proceed.
deny contains "unknown file operation" if not operation

deny contains "file path is missing" if not is_string(object.get(input, ["file", "path"], null))

deny contains msg if {
	raw := input.file.path
	startswith(raw, "/")
	msg := sprintf("file path '%s' must be relative to the workspace", [raw])
}

deny contains msg if {
	raw := input.file.path
	".." in split(raw, "/")
	msg := sprintf("file path '%s' must not contain '..'", [raw])
}

deny contains msg if {
	raw := input.file.path
	startswith(raw, "~")
	msg := sprintf("file path '%s' must not start with '~'", [raw])
}

deny contains "file path contains control characters" if {
	regex.match(`[[:cntrl:]]`, input.file.path)
}

deny contains msg if {
	count(protected_locations) > 0
	locs := roles.plain(concat(", ", sort([l | some l in protected_locations])))
	msg := sprintf("file path '%s' is in a protected location (%s)", [input.file.path, locs])
}

deny contains msg if {
	op := operation
	p := path
	not allow
	msg := sprintf("file %s of '%s' is not allowed for roles %s", [op, p, roles.known_label])
}

deny contains "deleting the workspace root is not allowed" if {
	operation == "delete"
	path == ""
	not probe
}

deny contains msg if {
	operation == "write"
	mode := object.get(input.file, "mode", null)
	mode != null
	not valid_mode(mode)
	msg := sprintf("file mode %v is not allowed: use permission bits 0..0o777 without setuid, setgid or sticky", [mode])
}

deny contains "file recursive flag must be a boolean" if {
	flag := object.get(input.file, "recursive", false)
	not is_boolean(flag)
}

# METADATA
# title: Valid mode
# description: True when `mode` is an integer permission mode without setuid, setgid or sticky bits.
valid_mode(mode) if {
	is_number(mode)
	mode == round(mode)
	mode >= 0
	mode <= 511
}

# METADATA
# title: Warnings
# description: Things the caller should know about an allowed file operation.
warn contains msg if {
	operation == "write"
	mode := input.file.mode
	valid_mode(mode)
	bits.and(mode, 2) == 2
	msg := sprintf("file mode %v makes '%s' writable by everyone", [mode, path])
}
