package mcp.command_test

import data.mcp.command

_input(roles, cmd) := {
	"version": 1,
	"action": "command.execute",
	"subject": {"id": "alice", "roles": roles, "auth": "token"},
	"command": object.union(
		{"name": "echo", "args": ["hi"], "cwd": "/workspace", "env": {}, "timeout": 30},
		cmd,
	),
	"sandbox": {"network": "none"},
}

_dev(name, args) := _input(["developer"], {"name": name, "args": args})

_admin(name, args) := _input(["admin"], {"name": name, "args": args})

# --- program names and the allowlist ---------------------------------------------

test_allowed_command_has_no_reasons if {
	count(command.deny) == 0 with input as _dev("echo", ["hi"])
	command.allow with input as _dev("echo", ["hi"])
}

test_program_name_forms if {
	command.program_name("echo") == "echo"
	command.program_name("/usr/bin/echo") == "echo"
	command.program_name("/bin/ls") == "ls"
	command.program_name("python3.12") == "python3.12"
}

test_program_name_rejects if {
	every name in ["./echo", "/tmp/echo", "/usr/local/bin/echo", "bin/echo", "-rf", ".hidden", "", "a b", 7] {
		not command.program_name(name)
	}
}

test_bad_command_name_denied if {
	msg := "command name '/tmp/x' must be a bare name or an absolute path under /usr/bin or /bin"
	msg in command.deny with input as _dev("/tmp/x", [])
}

test_command_not_on_allowlist if {
	"command 'rm' is not allowed for roles [readonly]" in command.deny with input as _input(["readonly"], {"name": "rm", "args": ["x"]})
	not command.allow with input as _input(["readonly"], {"name": "rm", "args": ["x"]})
}

test_command_allowed_by_any_role if {
	command.allow with input as _input(["readonly", "developer"], {"name": "rm", "args": ["x"]})
}

test_command_without_roles if {
	"command 'echo' is not allowed for roles []" in command.deny with input as _input([], {})
}

test_missing_command_denies if {
	reasons := command.deny with input as {"action": "command.execute", "subject": {"id": "a", "roles": ["admin"]}}
	"command.execute needs a command object" in reasons
	"command has no name" in reasons
	"command arguments must be a list of strings" in reasons
	"command working directory is missing" in reasons
	"command timeout must be a positive number of seconds" in reasons
}

test_arguments_must_be_strings if {
	"command arguments must be a list of strings" in command.deny with input as _dev("echo", ["a", 1])
	"command arguments must be a list of strings" in command.deny with input as _dev("echo", "hi")
}

# --- kinds ---------------------------------------------------------------------------

test_kinds if {
	every c in [
		["sh", "shell"], ["/bin/bash", "shell"], ["python3", "python"], ["python3.12", "python"],
		["pypy3.10", "python"], ["perl5.36", "perl"], ["ruby3.1", "ruby"], ["node", "node"],
		["xargs", "runner"], ["echo", "other"], ["pythonx", "other"],
	] {
		command.kind == c[1] with input as _dev(c[0], [])
	}
}

# --- runners ---------------------------------------------------------------------------

test_runners_never_allowed if {
	every prog in ["xargs", "nice", "timeout", "nohup", "setsid", "sudo", "su", "busybox", "/usr/bin/xargs"] {
		reasons := command.deny with input as _admin(prog, ["sh"])
		some r in reasons
		endswith(r, "runs another program and is never allowed")
	}
}

# --- shells and interpreters -------------------------------------------------------------

test_inline_code_denied if {
	every c in [
		["sh", ["-c", "id"], "-c"],
		["bash", ["-ec", "id"], "-ec"],
		["bash", ["-o", "pipefail", "-c", "id"], "-c"],
		["dash", ["-c", "id"], "-c"],
		["zsh", ["-c", "id"], "-c"],
		["fish", ["--command=id"], "--command=id"],
		["python3", ["-c", "import os"], "-c"],
		["python3", ["-Bc", "import os"], "-Bc"],
		["python3", ["-cimport os"], "-cimport os"],
		["python", ["-W", "ignore", "-c", "x"], "-c"],
		["perl", ["-e", "exec 'sh'"], "-e"],
		["perl", ["-lne", "print"], "-lne"],
		["perl", ["-E", "say 1"], "-E"],
		["ruby", ["-e", "exec 'sh'"], "-e"],
		["ruby", ["-ne", "print"], "-ne"],
		["node", ["-e", "1"], "-e"],
		["node", ["--eval=1"], "--eval=1"],
		["node", ["-p", "1"], "-p"],
		["node", ["--import", "data:text/javascript,1", "x.js"], "data:text/javascript,1"],
	] {
		msg := sprintf("argument '%s' to '%s' executes code", [c[2], c[0]])
		msg in command.deny with input as _admin(c[0], c[1])
	}
}

test_stdin_code_denied if {
	every c in [
		["sh", ["-s"], "-s"],
		["bash", ["-i"], "-i"],
		["python3", ["-i", "x.py"], "-i"],
		["node", ["-i"], "-i"],
		["node", ["--interactive"], "--interactive"],
	] {
		msg := sprintf("argument '%s' to '%s' reads code from stdin", [c[2], c[0]])
		msg in command.deny with input as _admin(c[0], c[1])
	}
}

test_interpreter_without_script_denied if {
	"'python3' without a script file reads code from stdin" in command.deny with input as _admin("python3", [])
	"'sh' without a script file reads code from stdin" in command.deny with input as _admin("sh", ["-x"])
	"'bash' with script '-' reads code from stdin" in command.deny with input as _admin("bash", ["-"])
	"'python3' with script '-' reads code from stdin" in command.deny with input as _admin("python3", ["--", "-"])
}

test_interpreter_with_script_allowed if {
	every c in [
		["sh", ["build.sh", "-c", "x"]],
		["bash", ["-x", "build.sh"]],
		["bash", ["-o", "pipefail", "build.sh"]],
		["python3", ["tool.py", "-c", "config.yaml"]],
		["python3", ["-m", "pytest", "-c", "pytest.ini"]],
		["python3", ["-W", "ignore", "-m", "pytest"]],
		["python3", ["--version"]],
		["perl", ["-MList::Util=sum", "x.pl"]],
		["perl", ["-w", "x.pl"]],
		["node", ["app.js", "-e"]],
		["bash", ["--", "-c"]],
	] {
		count(command.deny) == 0 with input as _admin(c[0], c[1])
	}
}

test_python_inline_modules_denied if {
	"module 'timeit' run by 'python3' executes inline code" in command.deny with input as _admin("python3", ["-m", "timeit", "x"])
	"module 'code' run by 'python3' executes inline code" in command.deny with input as _admin("python3", ["-m", "code"])
}

test_python_inline_module_after_many_options_denied if {
	# options_end must find the first end, not the textually smallest index
	args := ["-W", "x", "-W", "x", "-W", "x", "-W", "x", "-m", "timeit", "stmt"]
	"module 'timeit' run by 'python3' executes inline code" in command.deny with input as _admin("python3", args)
}

test_options_end_with_many_arguments if {
	command.options_end(["-x", "-x", "s", "a", "b", "c", "d", "e", "f", "g", "h", "i"], {"value": [], "stop": []}) == 2
}

test_python_hidden_module_denied if {
	msg := "argument '-Bm' to 'python3' hides -m MODULE; pass -m and the module separately"
	msg in command.deny with input as _admin("python3", ["-Bm", "timeit", "x"])
	msg2 := "argument '-mtimeit' to 'python3' hides -m MODULE; pass -m and the module separately"
	msg2 in command.deny with input as _admin("python3", ["-mtimeit", "x"])
}

test_perl_module_code_denied if {
	msg := "argument '-MPOSIX;system(1)' to 'perl' loads a module with code"
	msg in command.deny with input as _admin("perl", ["-MPOSIX;system(1)", "x.pl"])
}

test_perl_debugger_denied if {
	"argument '-d' to 'perl' runs the debugger" in command.deny with input as _admin("perl", ["-d", "x.pl"])
}

# --- option parsing helpers ------------------------------------------------------------------

test_options_end if {
	syntax := {"value": ["-o"], "stop": ["-m"]}
	command.options_end(["-x", "-o", "v", "script", "-c"], syntax) == 3
	command.options_end(["-x"], syntax) == 1
	command.options_end(["-m", "mod", "-c"], syntax) == 1
	command.options_end(["--", "-c"], syntax) == 0
	command.options_end(["-x", "-"], syntax) == 1
	command.options_end([], syntax) == 0
}

test_first_operand if {
	command.first_operand(["-x", "s"], 1) == "s"
	command.first_operand(["--", "-c"], 0) == "-c"
	not command.first_operand(["-x"], 1)
}

# --- env -----------------------------------------------------------------------------------------

test_env_running_a_program_denied if {
	"command 'env' runs another program 'sh'" in command.deny with input as _dev("env", ["FOO=1", "sh"])
	"command 'env' runs another program 'sh'" in command.deny with input as _dev("env", ["-i", "--", "sh"])
	"command 'env' runs another program 'ls'" in command.deny with input as _dev("env", ["-u", "HOME", "ls"])
	"argument '-S' to 'env' runs a command line" in command.deny with input as _dev("env", ["-S", "sh -c id"])
}

test_env_printing_allowed if {
	count(command.deny) == 0 with input as _dev("env", [])
	count(command.deny) == 0 with input as _dev("env", ["-u", "HOME"])
	count(command.deny) == 0 with input as _dev("env", ["--", "A=1"])
}

# --- options of other programs ----------------------------------------------------------------

test_option_effects_denied if {
	every c in [
		["find", [".", "-exec", "sh", ";"], "argument '-exec' to 'find' runs another program"],
		["find", [".", "-execdir", "x", ";"], "argument '-execdir' to 'find' runs another program"],
		["find", [".", "-ok", "x", ";"], "argument '-ok' to 'find' runs another program"],
		["find", [".", "-delete"], "argument '-delete' to 'find' deletes files"],
		["find", [".", "-fprint", "f"], "argument '-fprint' to 'find' writes files"],
		["git", ["-c", "core.pager=sh", "log"], "argument '-c' to 'git' sets configuration that can run programs"],
		["git", ["-ccore.pager=sh", "log"], "argument '-ccore.pager=sh' to 'git' sets configuration that can run programs"],
		["git", ["fetch", "--upload-pack=sh", "o"], "argument '--upload-pack=sh' to 'git' runs another program"],
		["git", ["clone", "--template=t", "u"], "argument '--template=t' to 'git' installs hooks that run programs"],
		["tar", ["-x", "--to-command=sh", "-f", "a.tar"], "argument '--to-command=sh' to 'tar' runs another program"],
		["tar", ["--checkpoint-action=exec=sh", "-xf", "a.tar"], "argument '--checkpoint-action=exec=sh' to 'tar' runs another program"],
		["tar", ["-Ish", "-xf", "a.tar"], "argument '-Ish' to 'tar' runs another program"],
		["make", ["--eval=x:"], "argument '--eval=x:' to 'make' evaluates inline makefile code"],
	] {
		c[2] in command.deny with input as _admin(c[0], c[1])
	}
}

test_option_candidates if {
	command.option_candidates("--to-command=sh") == {"--to-command=sh", "--to-command", "--"}
	command.option_candidates("-Ixz") == {"-Ixz", "-I"}
}

test_plain_find_and_tar_allowed if {
	count(command.deny) == 0 with input as _admin("find", [".", "-name", "*.py", "-executable"])
	count(command.deny) == 0 with input as _admin("tar", ["-czf", "out.tgz", "src"])
	count(command.deny) == 0 with input as _admin("tar", ["xzf", "a.tgz"])
}

test_tar_clusters_denied if {
	"argument '-xvIzstd' to 'tar' runs another program" in command.deny with input as _admin("tar", ["-xvIzstd", "a"])
	"argument 'xIf' to 'tar' runs another program" in command.deny with input as _admin("tar", ["xIf", "sh", "a"])
}

test_git_transports_denied if {
	"argument 'ext::sh -c id' to 'git' uses a transport that runs programs" in command.deny with input as _admin("git", ["clone", "ext::sh -c id", "d"])
}

test_git_subcommands if {
	every c in [
		[["config", "core.pager", "sh"], "git config may only read (--get, --list): settings can run programs"],
		[["filter-branch", "--tree-filter", "x"], "git filter-branch runs other programs"],
		[["bisect", "run", "x"], "git bisect run runs another program"],
		[["submodule", "foreach", "x"], "git submodule foreach runs another program"],
		[["rebase", "-x", "sh", "main"], "argument '-x' to 'git rebase' runs another program"],
		[["clone", "-u", "sh", "u"], "argument '-u' to 'git clone' runs another program"],
		[["ls-remote", "-usth", "u"], "argument '-usth' to 'git ls-remote' runs another program"],
	] {
		c[1] in command.deny with input as _admin("git", c[0])
	}
}

test_git_reading_allowed if {
	every args in [
		["status"], ["log", "--oneline", "-n", "5"], ["config", "--get", "user.name"],
		["config", "list"], ["-C", "sub", "status"], ["bisect", "good"], ["submodule", "update"],
		["rebase", "main"], ["clone", "https://example.org/r.git"], ["diff", "HEAD~1"],
	] {
		count(command.deny) == 0 with input as _admin("git", args)
	}
}

test_awk if {
	"argument 'BEGIN{system(\"id\")}' to 'awk' runs a shell command" in command.deny with input as _dev("awk", [`BEGIN{system("id")}`])
	"argument '{print | \"sh\"}' to 'awk' pipes to or from a shell command" in command.deny with input as _dev("awk", [`{print | "sh"}`])
	"argument '@load \"x\"' to 'awk' loads an extension" in command.deny with input as _dev("awk", [`@load "x"`])
	"argument '-l' to 'awk' loads an extension" in command.deny with input as _dev("awk", ["-l", "x", "{}"])
	count(command.deny) == 0 with input as _dev("awk", ["-F:", `{ if ($1 || $2) print $1 }`, "f.txt"])
}

test_sed if {
	reason := "argument '1e id' to 'sed' executes a shell command (the e command or flag)"
	reason in command.deny with input as _dev("sed", ["1e id", "f"])
	some r in command.deny with input as _dev("sed", ["-e", "s/x/y/e", "f"])
	startswith(r, "argument 's/x/y/e' to 'sed'")
	some r2 in command.deny with input as _dev("sed", ["--expression=s,x,y,ge", "f"])
	startswith(r2, "argument '--expression=s,x,y,ge' to 'sed'")
	count(command.deny) == 0 with input as _dev("sed", ["--sandbox", "1e id", "f"])
	count(command.deny) == 0 with input as _dev("sed", ["-i", "s/e/x/g", "f"])
	count(command.deny) == 0 with input as _dev("sed", ["-n", "/e/p", "f"])
}

test_sed_runs_command if {
	every script in ["e", "1e date", "$e", "/x/e cmd", "s/a/b/e", "s|a|b|ge", "-es/a/b/e", "p;e"] {
		command.sed_runs_command(script)
	}
	every script in ["s/a/e/", "s/e/x/", "/e/d", "-n", "y/abe/xyz/"] {
		not command.sed_runs_command(script)
	}
}

# --- environment ----------------------------------------------------------------------------------

_with_env(env) := _input(["developer"], {"env": env})

test_env_vars_denied if {
	every name in ["LD_PRELOAD", "LD_LIBRARY_PATH", "BASH_ENV", "ENV", "PYTHONSTARTUP", "PYTHONPATH", "PERL5OPT", "NODE_OPTIONS", "GIT_SSH_COMMAND", "BASH_FUNC_x", "PATH"] {
		msg := sprintf("environment variable '%s' is not allowed: it changes how programs start", [name])
		msg in command.deny with input as _with_env({name: "x"})
	}
}

test_env_vars_allowed if {
	count(command.deny) == 0 with input as _with_env({"LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1", "TZ": "UTC"})
}

test_env_var_shape if {
	"environment variable name 'A-B' is not valid" in command.deny with input as _with_env({"A-B": "x"})
	"environment variable 'A' must have a string value" in command.deny with input as _with_env({"A": 1})
	"command environment must be an object of strings" in command.deny with input as _with_env(["A=1"])
}

test_env_denial_function if {
	not command.env_denial("LANG")
	command.env_denial("1X") == "environment variable name '1X' is not valid"
}

# --- working directory and timeout --------------------------------------------------------------

test_cwd if {
	every cwd in ["/workspace", "/workspace/", "/workspace/src", "/workspace//a/./b"] {
		count(command.deny) == 0 with input as _input(["developer"], {"cwd": cwd})
	}
	every cwd in ["/", "/etc", "/workspacex", "workspace", "/workspace/../etc", "/tmp/workspace"] {
		msg := sprintf("working directory '%s' is outside /workspace", [cwd])
		msg in command.deny with input as _input(["developer"], {"cwd": cwd})
	}
	"command working directory is missing" in command.deny with input as _input(["developer"], {"cwd": null})
}

test_timeout_capped if {
	command.limits.timeout_s == 30 with input as _input(["readonly"], {"timeout": 300})
	command.limits.timeout_s == 10 with input as _input(["readonly"], {"timeout": 10})
	"timeout 300s exceeds the cap for roles [readonly]; capped to 30s" in command.warn with input as _input(["readonly"], {"timeout": 300})
	count(command.deny) == 0 with input as _input(["readonly"], {"timeout": 300})
}

test_timeout_invalid if {
	every t in [0, -1, "30", null] {
		"command timeout must be a positive number of seconds" in command.deny with input as _input(["developer"], {"timeout": t})
	}
	command.timeout_s == 600 with input as _input(["developer"], {"timeout": "x"})
}

test_limits_take_most_generous_role if {
	lim := command.limits with input as _input(["readonly", "agent"], {"timeout": 1000})
	lim == {"timeout_s": 120, "memory_bytes": 536870912, "pids": 128, "cpu_seconds": 120, "output_bytes": 1048576}
}

test_limits_single_role if {
	lim := command.limits with input as _input(["developer"], {"timeout": 5})
	lim == {"timeout_s": 5, "memory_bytes": 1073741824, "pids": 256, "cpu_seconds": 600, "output_bytes": 4194304}
}
