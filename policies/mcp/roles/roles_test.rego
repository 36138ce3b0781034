package mcp.roles_test

import data.mcp.roles

_defs := {
	"a": {"limits": {"timeout_s": 10}},
	"b": {"limits": {"timeout_s": 60}},
}

test_known_keeps_only_defined_string_roles if {
	roles.known == {"a"} with input.subject.roles as ["a", "zz", 7]
		with data.gateway.roles as _defs
}

test_unknown_lists_undefined_roles if {
	roles.unknown == {"zz"} with input.subject.roles as ["a", "zz", 7]
		with data.gateway.roles as _defs
}

test_known_empty_without_roles if {
	count(roles.known) == 0 with input.subject as {"id": "x"}
}

test_label_sorts if {
	roles.label({"b", "a"}) == "[a, b]"
}

test_label_empty if {
	roles.label(set()) == "[]"
}

test_cap_takes_most_generous if {
	roles.caps == {"timeout_s": 60} with input.subject.roles as ["a", "b"]
		with data.gateway.roles as _defs
		with data.gateway.limit_names as ["timeout_s"]
}

test_under_star if {
	roles.under("", "*")
	roles.under("x/y", "*")
}

test_under_prefix if {
	roles.under("src", "src/")
	roles.under("src/a/b.txt", "src/")
	roles.under("src/a", "src")
}

test_not_under_prefix if {
	not roles.under("srcx/a", "src/")
	not roles.under("", "src/")
	not roles.under("x", "/")
}

test_normalise if {
	roles.normalise("./src//a/./b") == "src/a/b"
	roles.normalise(".") == ""
	roles.normalise("") == ""
	roles.normalise("a/../b") == "a/../b"
}
