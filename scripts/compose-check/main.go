// compose-check validates <repo>/compose.yaml with Docker Compose's own loader (compose-go),
// then checks that what the file references exists in the repo. Run by scripts/check-compose.sh.
//
//  1. Loading without PLUGIN_INTERNAL_SECRET must fail with the `:?` message.
//  2. Loading with a dummy one must succeed: compose-go validates against the Compose
//     Specification JSON Schema (unknown keys, wrong types) and checks consistency
//     (depends_on targets, volumes, networks).
//  3. Repo references (text checks, not a Rust parse):
//     - services kafka, postgres, projector, gateway exist;
//     - every build context dir and its dockerfile exist, the Dockerfile builds `-p nself`
//     and cli/Cargo.toml has `name = "nself"`;
//     - a command ["nself", "claw", SUB] has SUB as a whole word (any case) in cli/src/main.rs,
//     where clap derives it from an enum variant (`Serve` -> serve, `Projector` -> projector);
//     - every env name of gateway/projector except RUST_LOG appears as a whole word in
//     gateway/src/config.rs or cli/src/**, or is one of the distributed-mode names below;
//     - the path in the gateway's healthcheck URL is a route string in gateway/src/routes/mod.rs.
package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"

	"github.com/compose-spec/compose-go/v2/cli"
	"github.com/compose-spec/compose-go/v2/types"
)

// Distributed-mode settings that may not be in the Rust sources yet.
var knownEnv = map[string]bool{
	"CLAW_KAFKA_BROKERS": true, "CLAW_KAFKA_TOPIC": true, "CLAW_KAFKA_GROUP": true, "CLAW_DATABASE_URL": true,
}

var errs []string

func fail(format string, a ...any) { errs = append(errs, fmt.Sprintf(format, a...)) }

func load(repo string, env []string) (*types.Project, error) {
	opts, err := cli.NewProjectOptions([]string{filepath.Join(repo, "compose.yaml")},
		cli.WithWorkingDirectory(repo), cli.WithName("claw"), cli.WithEnv(env),
		cli.WithInterpolation(true), cli.WithResolvedPaths(true), cli.WithConsistency(true))
	if err != nil {
		return nil, err
	}
	return cli.ProjectFromOptions(context.Background(), opts)
}

func read(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		fail("%v", err)
	}
	return string(b)
}

func word(text, w string) bool {
	return regexp.MustCompile(`(?i)\b` + regexp.QuoteMeta(w) + `\b`).MatchString(text)
}

func main() {
	repo, _ := filepath.Abs(".")
	if len(os.Args) > 1 {
		repo, _ = filepath.Abs(os.Args[1])
	}
	file := filepath.Join(repo, "compose.yaml")

	if _, err := load(repo, nil); err == nil {
		fail("loading without PLUGIN_INTERNAL_SECRET succeeded; want the `:?set PLUGIN_INTERNAL_SECRET` error")
	} else if !strings.Contains(err.Error(), "set PLUGIN_INTERNAL_SECRET") {
		fail("loading without PLUGIN_INTERNAL_SECRET failed, but not with its `:?` message: %v", err)
	}

	p, err := load(repo, []string{"PLUGIN_INTERNAL_SECRET=compose-check-dummy"})
	if err != nil {
		hint := ""
		if strings.Contains(err.Error(), "false schema") {
			hint = " (\"false schema\": that key is not allowed there by the Compose Specification)"
		}
		fmt.Fprintf(os.Stderr, "compose-check: ERROR: %s does not load: %v%s\n", file, err, hint)
		os.Exit(1)
	}

	cliSrc := ""
	_ = filepath.WalkDir(filepath.Join(repo, "cli", "src"), func(path string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() && strings.HasSuffix(path, ".rs") {
			cliSrc += read(path) + "\n"
		}
		return nil
	})
	mainRs := read(filepath.Join(repo, "cli", "src", "main.rs"))
	envSrc := read(filepath.Join(repo, "gateway", "src", "config.rs")) + "\n" + cliSrc
	if !regexp.MustCompile(`(?m)^name\s*=\s*"nself"`).MatchString(read(filepath.Join(repo, "cli", "Cargo.toml"))) {
		fail(`cli/Cargo.toml: no name = "nself"`)
	}

	for _, name := range []string{"kafka", "postgres", "projector", "gateway"} {
		if _, ok := p.Services[name]; !ok {
			fail("service %q missing", name)
		}
	}

	names := make([]string, 0, len(p.Services))
	for name := range p.Services {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		s := p.Services[name]
		if s.Build != nil {
			checkBuild(name, s.Build)
		}
		if len(s.Command) >= 3 && s.Command[0] == "nself" && s.Command[1] == "claw" {
			if !word(mainRs, s.Command[2]) {
				fail("service %s: subcommand %q not found in cli/src/main.rs", name, s.Command[2])
			}
		} else if s.Build != nil {
			fail("service %s: command %q is not [nself, claw, SUB]", name, []string(s.Command))
		}
		if name != "gateway" && name != "projector" {
			continue
		}
		for env := range s.Environment {
			if env != "RUST_LOG" && !knownEnv[env] && !word(envSrc, env) {
				fail("service %s: env %s is not read by the gateway (not in gateway/src/config.rs or cli/src)", name, env)
			}
		}
	}

	if g, ok := p.Services["gateway"]; ok && g.HealthCheck != nil {
		if m := regexp.MustCompile(`https?://[^/\s]+(/\S*)`).FindStringSubmatch(strings.Join(g.HealthCheck.Test, " ")); m != nil {
			if !strings.Contains(read(filepath.Join(repo, "gateway", "src", "routes", "mod.rs")), `"`+m[1]+`"`) {
				fail("service gateway: healthcheck path %s is not a route in gateway/src/routes/mod.rs", m[1])
			}
		}
	}

	if len(errs) > 0 {
		for _, e := range errs {
			fmt.Fprintf(os.Stderr, "compose-check: ERROR: %s\n", e)
		}
		os.Exit(1)
	}
	fmt.Printf("compose-check: OK: %s (%d services: %s)\n", file, len(names), strings.Join(names, ", "))
}

func checkBuild(name string, b *types.BuildConfig) {
	if st, err := os.Stat(b.Context); err != nil || !st.IsDir() {
		fail("service %s: build context %s is not a directory", name, b.Context)
		return
	}
	df := b.Dockerfile
	if !filepath.IsAbs(df) {
		df = filepath.Join(b.Context, df)
	}
	text, err := os.ReadFile(df)
	if err != nil {
		fail("service %s: dockerfile: %v", name, err)
		return
	}
	if !regexp.MustCompile(`cargo build[^\n]*-p nself\b`).Match(text) {
		fail("service %s: %s does not `cargo build ... -p nself`", name, df)
	}
}
