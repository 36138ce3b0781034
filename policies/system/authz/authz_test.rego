package system.authz_test

import data.system.authz

_hashes := {"system": {"gateway": {"token_sha256": [crypto.sha256("current"), crypto.sha256("rotated")]}}}

_decision(identity) := {"method": "POST", "path": ["v1", "data", "mcp", "decision"], "identity": identity}

test_health_is_open if {
	authz.allow with input as {"method": "GET", "path": ["health"]}
}

test_gateway_token_may_ask_for_decisions if {
	authz.allow with input as _decision("rotated") with data.system.gateway as _hashes.system.gateway
}

test_wrong_or_missing_token_is_refused if {
	not authz.allow with input as _decision("wrong") with data.system.gateway as _hashes.system.gateway
	not authz.allow with input as _decision("") with data.system.gateway as _hashes.system.gateway
	not authz.allow with input as {"method": "POST", "path": ["v1", "data", "mcp", "decision"]}
		with data.system.gateway as _hashes.system.gateway
}

test_no_token_list_refuses_everyone if {
	not authz.allow with input as _decision("rotated")
}

test_only_the_decision_endpoint if {
	gw := _hashes.system.gateway
	not authz.allow with input as {"method": "GET", "path": ["v1", "data"], "identity": "rotated"}
		with data.system.gateway as gw
	not authz.allow with input as {"method": "PUT", "path": ["v1", "policies", "x"], "identity": "rotated"}
		with data.system.gateway as gw
	not authz.allow with input as {"method": "GET", "path": ["v1", "data", "mcp", "decision"], "identity": "rotated"}
		with data.system.gateway as gw
	not authz.allow with input as {"method": "POST", "path": ["health"]}
}
