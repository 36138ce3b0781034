# METADATA
# title: Roles
# description: |
#   Resolves the subject's roles against data.gateway.roles and offers the
#   helpers the area policies share (role labels, limit caps, path prefixes).
package mcp.roles

# METADATA
# title: Known roles
# description: The subject's roles that data.gateway.roles defines; unknown names grant nothing.
known contains role if {
	some role in input.subject.roles
	is_string(role)
	data.gateway.roles[role]
}

# METADATA
# title: Unknown roles
# description: Role names the subject carries that data.gateway.roles does not define.
unknown contains role if {
	some role in input.subject.roles
	is_string(role)
	not data.gateway.roles[role]
}

# METADATA
# title: Role label
# description: Renders a set of role names for messages, e.g. "[agent, readonly]".
label(role_set) := sprintf("[%s]", [plain(concat(", ", sort([r | some r in role_set])))])

# METADATA
# title: Limit caps
# description: |
#   For each limit in data.gateway.limit_names, the most generous value over
#   the subject's known roles (roles grant, so the widest wins); with one known
#   role simply its limits. Spelled without max(): rego-cpp's max() compares
#   numbers as text.
caps := data.gateway.roles[r].limits if {
	count(known) == 1
	some r in known
} else := _widest_limits

_widest_limits[name] := value if {
	some name in data.gateway.limit_names
	some r in known
	value := data.gateway.roles[r].limits[name]
	not _exceeded(name, value)
}

_exceeded(name, value) if {
	some r in known
	data.gateway.roles[r].limits[name] > value
}

# METADATA
# title: Known roles label
# description: The subject's known roles rendered for messages, e.g. "[agent, readonly]".
known_label := label(known)

# METADATA
# title: Path under prefix
# description: |
#   True when the normalised relative `path` lies under `prefix`: "*" is the
#   whole workspace, "src/" is the directory src and everything below it.
under(_, "*")

under(path, prefix) if {
	dir := trim_suffix(prefix, "/")
	dir != ""
	path == dir
}

under(path, prefix) if {
	dir := trim_suffix(prefix, "/")
	dir != ""
	startswith(path, concat("", [dir, "/"]))
}

# METADATA
# title: Normalised path
# description: |
#   `path` split on "/" with empty and "." segments dropped, joined again:
#   "./src//a" becomes "src/a", "." and "" become "". ".." is kept (and denied elsewhere).
normalise(path) := plain(concat("/", [s | some s in split(path, "/"); s != ""; s != "."]))

# METADATA
# title: Plain string
# description: |
#   `s` unchanged. In OPA a no-op; in rego-cpp (the embedded engine) strings
#   made by concat() and some other builtins print with their JSON quotes
#   through sprintf, and substring() makes a plain copy. Wrap such strings in
#   plain() before they reach sprintf.
plain(s) := substring(s, 0, -1)
