// Command inject is Istio's own injector, run as `istioctl kube-inject` runs it, for the tests that
// hold our injector to Istio's behaviour. It renders Istio's istio-discovery chart from a manifests
// directory (the module cache's copy, given with --manifests) exactly as Istio's own injection tests
// do, takes the sidecar injector's templates and values and the default mesh config from it, and
// injects with pkg/kube/inject.
//
// Usage:
//
//	inject --manifests DIR [--set values.x=y ...] [-f FILE ...]   # YAML in (stdin by default), YAML out
//	inject --manifests DIR --json < docs.yaml                      # one JSON line per document
//
// With --json every YAML document of the input is injected on its own and answered with one line,
// {"injected": "<yaml>"} or {"error": "<message>"}, flushed at once, so that one run answers many
// pods (a refusal does not stop the others). Native sidecars follow ENABLE_NATIVE_SIDECARS, as in istioctl
// without a cluster: "true" for the layout of Istio's golden files (nodes of Kubernetes 1.33+).
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"

	"k8s.io/apimachinery/pkg/util/yaml"

	"istio.io/istio/pkg/config/mesh"
	"istio.io/istio/pkg/kube/inject"
	istiolog "istio.io/istio/pkg/log"

	"injector.test/istio/internal/settings"
)

// setFlags collects repeated --set options (Istio's install values, as `istioctl install --set`).
type setFlags []string

func (s *setFlags) String() string { return strings.Join(*s, ",") }

func (s *setFlags) Set(v string) error {
	*s = append(*s, v)
	return nil
}

// oracle injects with the settings of an installation rendered as Istio's injection tests render
// it (profile empty, pilot only), so that it is configured exactly like the one that produced
// Istio's golden files.
type oracle struct {
	*settings.Settings
}

// injectOne injects one YAML stream (one or more documents) with a fresh copy of the mesh config,
// since IntoResourceFile applies a pod's proxy.istio.io/config to the mesh config it is given.
func (s oracle) injectOne(in io.Reader, out io.Writer) error {
	meshCopy, err := mesh.DeepCopyMeshConfig(s.Mesh)
	if err != nil {
		return err
	}
	warn := func(message string) { fmt.Fprint(os.Stderr, message) }
	return inject.IntoResourceFile(nil, s.Config.Templates, s.Values, "", meshCopy, in, out, warn)
}

// answerEach injects every document of in on its own and writes one JSON line per document,
// flushed at once: a test can keep one process and send it a document at a time, each ended by
// a "---" line (the reader returns a document when it sees the next one begin).
func (s oracle) answerEach(in io.Reader, out *bufio.Writer) error {
	reader := yaml.NewYAMLReader(bufio.NewReaderSize(in, 1<<16))
	encoder := json.NewEncoder(out)
	for {
		document, err := reader.Read()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		if len(bytes.TrimSpace(document)) == 0 {
			continue
		}
		var injected bytes.Buffer
		answer := map[string]string{}
		if err := s.injectOne(bytes.NewReader(document), &injected); err != nil {
			answer["error"] = err.Error()
		} else {
			answer["injected"] = injected.String()
		}
		if err := encoder.Encode(answer); err != nil {
			return err
		}
		if err := out.Flush(); err != nil {
			return err
		}
	}
}

func run() error {
	// Istio logs to stdout by default; stdout is the injected YAML (or the JSON answers).
	logOptions := istiolog.DefaultOptions()
	logOptions.OutputPaths = []string{"stderr"}
	logOptions.ErrorOutputPaths = []string{"stderr"}
	if err := istiolog.Configure(logOptions); err != nil {
		return err
	}
	var sets, files setFlags
	manifests := flag.String("manifests", "", "Istio's manifests/ directory (in the Go module cache)")
	asJSON := flag.Bool("json", false, "inject each document on its own; one JSON line per document")
	flag.Var(&sets, "set", "an install value, as istioctl's --set (repeatable)")
	flag.Var(&files, "f", "an input file, - for stdin (repeatable; stdin when none)")
	flag.Parse()
	if *manifests == "" || flag.NArg() != 0 {
		return errors.New("usage: inject --manifests DIR [--set k=v ...] [--json] [-f FILE ...]")
	}
	rendered, err := settings.Load(*manifests, sets)
	if err != nil {
		return err
	}
	loaded := oracle{rendered}
	if len(files) == 0 {
		files = setFlags{"-"}
	}
	out := bufio.NewWriter(os.Stdout)
	defer out.Flush()
	for _, name := range files {
		var in io.Reader = os.Stdin
		if name != "-" {
			file, err := os.Open(name)
			if err != nil {
				return err
			}
			defer file.Close()
			in = file
		}
		if *asJSON {
			err = loaded.answerEach(in, out)
		} else {
			err = loaded.injectOne(in, out)
		}
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
	}
	return nil
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "inject:", err)
		os.Exit(1)
	}
}
