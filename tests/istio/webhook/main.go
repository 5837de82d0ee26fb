// Command webhook is Istio's sidecar injection webhook served over HTTPS, for the benchmarks that
// set our injector beside it (bench/bench_istio_http.py; the cluster benchmark behind a
// MutatingWebhookConfiguration). It is istiod's injection path and nothing else: the handler that
// pkg/kube/inject.NewWebhook registers on a mux (`/inject`, `/inject/...`), configured with the
// templates, values and mesh config of Istio's default istio-discovery chart (rendered as Istio's
// own injection tests render it, by the shared loader in internal/settings), behind Go's net/http
// TLS server with the given certificate and key. No Kubernetes API, no xDS, no CA: the cost
// measured is the webhook's.
//
// Usage:
//
//	webhook --port PORT --cert tls.crt --key tls.key [--host 127.0.0.1] [--manifests DIR]
//
// It answers GET /healthz with 200 once it serves, for whoever starts it to wait on.
//
// It runs on one core unless GOMAXPROCS says otherwise (the benchmarks give each server one core),
// and with ENABLE_NATIVE_SIDECARS=false unless that is set (our injector's default is no native
// sidecars, and Istio's default "auto" would look for nodes in a Kubernetes API this program does
// not have): Istio reads that variable when its packages are initialised, before main runs, so
// when it is unset the program executes itself again with it set.
package main

import (
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"runtime"
	"strconv"
	"time"

	"injector.test/istio/internal/settings"
)

// server is Istio's webhook and /healthz on one mux, behind TLS 1.2+ with the given pair.
func server(address, certFile, keyFile, manifests string) (*http.Server, error) {
	pair, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("the serving certificate: %w", err)
	}
	loaded, err := settings.Load(manifests, nil)
	if err != nil {
		return nil, err
	}
	mux := http.NewServeMux()
	if _, err := loaded.Webhook(mux); err != nil {
		return nil, fmt.Errorf("Istio's webhook: %w", err)
	}
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.WriteHeader(http.StatusOK)
	})
	return &http.Server{
		Addr:    address,
		Handler: mux,
		TLSConfig: &tls.Config{
			Certificates: []tls.Certificate{pair},
			MinVersion:   tls.VersionTLS12,
		},
		// As istiod's HTTPS server: a client that never finishes its headers is dropped.
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       90 * time.Second,
	}, nil
}

func run() error {
	if err := settings.WithNativeSidecarsSet(); err != nil {
		return err
	}
	if _, set := os.LookupEnv("GOMAXPROCS"); !set {
		runtime.GOMAXPROCS(1)
	}
	host := flag.String("host", "127.0.0.1", "the address to listen on")
	port := flag.Int("port", 0, "the port to listen on (required)")
	certFile := flag.String("cert", "", "the serving certificate chain, PEM (required)")
	keyFile := flag.String("key", "", "its private key, PEM (required)")
	manifests := flag.String("manifests", "",
		"Istio's manifests/ directory (default: the pinned module's, in the Go module cache)")
	flag.Parse()
	if *port <= 0 || *port > 65535 || *certFile == "" || *keyFile == "" || flag.NArg() != 0 {
		return errors.New("usage: webhook --port PORT --cert FILE --key FILE " +
			"[--host ADDRESS] [--manifests DIR]")
	}
	if *manifests == "" {
		found, err := settings.Manifests()
		if err != nil {
			return err
		}
		*manifests = found
	}
	address := net.JoinHostPort(*host, strconv.Itoa(*port))
	https, err := server(address, *certFile, *keyFile, *manifests)
	if err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "webhook: Istio's injection webhook on https://%s/inject (GOMAXPROCS=%d, %s=%s)\n",
		address, runtime.GOMAXPROCS(0), settings.NativeSidecarsVariable, os.Getenv(settings.NativeSidecarsVariable))
	return https.ListenAndServeTLS("", "")
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "webhook:", err)
		os.Exit(2)
	}
}
