// Command injectbench times Istio's injection webhook in process, on pods given as AdmissionReview
// JSON files, for bench/bench_istio_inject.py, which times ours on the very same bytes.
//
// Istio's webhook is built as istiod builds it (inject.NewWebhook on a mux, with the templates,
// values and mesh config of Istio's default istio-discovery chart, rendered as Istio's own tests
// render them: internal/settings), and each iteration calls the handler it registered at /inject
// with the review's bytes, so the timed loop holds everything istiod's handler does between
// receiving a request body and writing the response: reading the body, checking its content
// type, decoding the AdmissionReview with Kubernetes' deserializer, unmarshalling the pod, the
// injection policy, the effective ProxyConfig, rendering the sidecar template, merging it into the
// pod, computing the JSON patch, encoding the response AdmissionReview, writing it, and the
// handler's own metrics. Outside the loop: TLS, HTTP parsing and the network (an in-memory request
// and response writer stand in for them, reused across iterations), the chart's rendering and the
// webhook's construction. Istio's logging is set to errors only, as Istio's own
// BenchmarkInjection does (ours logs nothing in the function we time either).
//
// Before timing a pod it checks, once, that Istio really injected it (allowed, a non-empty JSON
// patch that adds the istio-proxy container), so that a refusal is never timed; a pod Istio does
// not inject fails the run.
//
// Usage:
//
//	injectbench [--manifests DIR] [--benchtime 1s|Nx] REVIEW.json ...
//
// It prints one JSON object: {"pods": [{"file", "ns_per_op", "cpu_ns_per_op", "bytes_per_op",
// "allocs_per_op", "iterations", "review_bytes", "response_bytes", "patch_bytes"}, ...]}:
// ns_per_op is testing.Benchmark's (wall time), cpu_ns_per_op the process's CPU time (user and
// system, the garbage collector's included) over the same iterations, which a machine busy with
// other work disturbs less. It runs on one core
// (GOMAXPROCS=1) unless GOMAXPROCS says otherwise, and with ENABLE_NATIVE_SIDECARS=false (see
// internal/settings) unless that is set: Istio reads it when its packages are initialised, before
// main runs, so when it is unset the program executes itself again with it set.
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"injector.test/istio/internal/settings"
	istiolog "istio.io/istio/pkg/log"
)

// recorder is the handler's response writer, reused across iterations (httptest's would allocate
// a recorder, a header map and a buffer per call, a cost istiod's server does not have).
type recorder struct {
	header http.Header
	status int
	body   bytes.Buffer
}

func (r *recorder) Header() http.Header { return r.header }

func (r *recorder) WriteHeader(status int) {
	if r.status == 0 {
		r.status = status
	}
}

func (r *recorder) Write(data []byte) (int, error) {
	if r.status == 0 {
		r.status = http.StatusOK
	}
	return r.body.Write(data)
}

func (r *recorder) reset() {
	clear(r.header)
	r.status = 0
	r.body.Reset()
}

// call sends review to handler as an API server's POST /inject would arrive, and leaves the
// answer in out. The request is rebuilt around the same bytes each time: only its body reader is
// new.
func call(handler http.Handler, request *http.Request, review []byte, out *recorder) {
	out.reset()
	request.Body = io.NopCloser(bytes.NewReader(review))
	handler.ServeHTTP(out, request)
}

// newRequest is a POST /inject as kube-apiserver sends it, less the body (set by call).
func newRequest(length int) *http.Request {
	return &http.Request{
		Method:        http.MethodPost,
		URL:           &url.URL{Path: "/inject"},
		Proto:         "HTTP/1.1",
		ProtoMajor:    1,
		ProtoMinor:    1,
		Header:        http.Header{"Content-Type": {"application/json"}},
		ContentLength: int64(length),
		Host:          "istiod.istio-system.svc:443",
		RequestURI:    "/inject",
	}
}

// checkInjected fails unless the answer allows the pod with a JSON patch that adds istio-proxy;
// it returns the patch's size.
func checkInjected(out *recorder) (int, error) {
	if out.status != http.StatusOK {
		return 0, fmt.Errorf("HTTP %d: %s", out.status, strings.TrimSpace(out.body.String()))
	}
	var answer struct {
		Response *struct {
			Allowed bool   `json:"allowed"`
			Patch   []byte `json:"patch"`
			Result  *struct {
				Message string `json:"message"`
			} `json:"status"`
		} `json:"response"`
	}
	if err := json.Unmarshal(out.body.Bytes(), &answer); err != nil {
		return 0, fmt.Errorf("the answer is not an AdmissionReview: %w", err)
	}
	response := answer.Response
	if response == nil {
		return 0, errors.New("the answer has no response")
	}
	if !response.Allowed || len(response.Patch) == 0 {
		message := ""
		if response.Result != nil {
			message = response.Result.Message
		}
		return 0, fmt.Errorf("not injected (allowed %t, %d patch bytes) %s", response.Allowed,
			len(response.Patch), message)
	}
	var operations []struct {
		Op    string          `json:"op"`
		Path  string          `json:"path"`
		Value json.RawMessage `json:"value"`
	}
	if err := json.Unmarshal(response.Patch, &operations); err != nil {
		return 0, fmt.Errorf("the patch is not a JSON patch: %w", err)
	}
	for _, operation := range operations {
		if operation.Op != "add" || !strings.HasPrefix(operation.Path, "/spec/containers") {
			continue
		}
		// One container, or the whole list when the pod had none.
		var one struct{ Name string }
		var many []struct{ Name string }
		if json.Unmarshal(operation.Value, &one) == nil && one.Name == "istio-proxy" {
			return len(response.Patch), nil
		}
		if json.Unmarshal(operation.Value, &many) == nil {
			for _, container := range many {
				if container.Name == "istio-proxy" {
					return len(response.Patch), nil
				}
			}
		}
	}
	return 0, errors.New("the patch adds no istio-proxy container")
}

// processCPU is the CPU time this process has used so far, user and system.
func processCPU() time.Duration {
	var usage syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &usage); err != nil {
		panic(fmt.Sprintf("getrusage: %v", err))
	}
	return time.Duration(usage.Utime.Nano() + usage.Stime.Nano())
}

// figure is one pod's timing, as printed.
type figure struct {
	File          string `json:"file"`
	NsPerOp       int64  `json:"ns_per_op"`
	CPUNsPerOp    int64  `json:"cpu_ns_per_op"`
	BytesPerOp    int64  `json:"bytes_per_op"`
	AllocsPerOp   int64  `json:"allocs_per_op"`
	Iterations    int    `json:"iterations"`
	ReviewBytes   int    `json:"review_bytes"`
	ResponseBytes int    `json:"response_bytes"`
	PatchBytes    int    `json:"patch_bytes"`
}

func measure(handler http.Handler, file string) (figure, error) {
	review, err := os.ReadFile(file)
	if err != nil {
		return figure{}, err
	}
	request := newRequest(len(review))
	out := &recorder{header: http.Header{}}
	call(handler, request, review, out)
	patchBytes, err := checkInjected(out)
	if err != nil {
		return figure{}, fmt.Errorf("%s: Istio's webhook did not inject it, so it is not timed: %w",
			file, err)
	}
	responseBytes := out.body.Len()
	// testing.Benchmark calls the function with a growing N until the run lasts the benchtime;
	// its result is the last call's, and so is the CPU time kept here.
	var cpuPerOp time.Duration
	result := testing.Benchmark(func(b *testing.B) {
		b.ReportAllocs()
		started, iterations := processCPU(), 0
		for b.Loop() {
			call(handler, request, review, out)
			iterations++
		}
		cpuPerOp = (processCPU() - started) / time.Duration(max(iterations, 1))
	})
	if result.N == 0 {
		return figure{}, fmt.Errorf("%s: the benchmark did not run", file)
	}
	return figure{
		File:          file,
		NsPerOp:       result.NsPerOp(),
		CPUNsPerOp:    cpuPerOp.Nanoseconds(),
		BytesPerOp:    result.AllocedBytesPerOp(),
		AllocsPerOp:   result.AllocsPerOp(),
		Iterations:    result.N,
		ReviewBytes:   len(review),
		ResponseBytes: responseBytes,
		PatchBytes:    patchBytes,
	}, nil
}

func run() error {
	if err := settings.WithNativeSidecarsSet(); err != nil {
		return err
	}
	if os.Getenv("GOMAXPROCS") == "" {
		runtime.GOMAXPROCS(1)
	}
	// Istio logs to stdout by default; stdout is our JSON. Errors only, as BenchmarkInjection.
	logOptions := istiolog.DefaultOptions()
	logOptions.OutputPaths = []string{"stderr"}
	logOptions.ErrorOutputPaths = []string{"stderr"}
	logOptions.SetDefaultOutputLevel("all", istiolog.ErrorLevel)
	if err := istiolog.Configure(logOptions); err != nil {
		return err
	}
	// testing.Benchmark reads its duration from the testing package's flags.
	testing.Init()
	manifests := flag.String("manifests", "", "Istio's manifests/ directory (default: the Go "+
		"module cache's, for the Istio this was built with)")
	benchtime := flag.String("benchtime", "1s", "per pod: a duration, or Nx for N iterations")
	flag.Parse()
	if flag.NArg() == 0 {
		return errors.New("usage: injectbench [--manifests DIR] [--benchtime 1s|Nx] REVIEW.json ...")
	}
	if err := flag.Set("test.benchtime", *benchtime); err != nil {
		return fmt.Errorf("--benchtime %q: %w", *benchtime, err)
	}
	if *manifests == "" {
		found, err := settings.Manifests()
		if err != nil {
			return err
		}
		*manifests = found
	}
	loaded, err := settings.Load(*manifests, nil)
	if err != nil {
		return err
	}
	mux := http.NewServeMux()
	if _, err := loaded.Webhook(mux); err != nil {
		return err
	}
	figures := []figure{}
	for _, file := range flag.Args() {
		one, err := measure(mux, file)
		if err != nil {
			return err
		}
		figures = append(figures, one)
	}
	return json.NewEncoder(os.Stdout).Encode(map[string]any{"pods": figures})
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "injectbench:", err)
		os.Exit(1)
	}
}
