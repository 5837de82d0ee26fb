// Command caclient asks a CA for a certificate the way an Istio sidecar does: with Istio's own
// CA client (security/pkg/nodeagent/caclient/providers/citadel, as pilot-agent uses it), over
// TLS, with the service-account token in the `authorization` metadata and the cluster's ID in
// `ClusterID`. It exists so that the tests of injector's gRPC CA talk to a real Istio peer
// rather than to our own idea of one.
//
// On success it writes the chain the CA answered, one PEM block after another in the order
// received (Istio's convention: leaf first, root last), to -out and exits 0. On failure it
// prints the error as Istio's client reports it, on one line of stderr, and exits 1; a bad
// argument exits 2.
package main

import (
	"flag"
	"fmt"
	"os"
	"strings"

	"istio.io/istio/pkg/security"
	"istio.io/istio/security/pkg/nodeagent/caclient/providers/citadel"
)

// tokenFile hands the client the token in a file, read on each request as pilot-agent's
// file-based credential fetcher does.
type tokenFile struct{ path string }

func (t tokenFile) GetPlatformCredential() (string, error) {
	token, err := os.ReadFile(t.path)
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(string(token)), nil
}

func (t tokenFile) GetIdentityProvider() string { return "" }

func (t tokenFile) Stop() {}

func main() {
	addr := flag.String("addr", "", "the CA's host:port")
	root := flag.String("root", "", "PEM file of the root that signed the CA's serving certificate")
	san := flag.String("san", "", "the name to verify in the CA's serving certificate (default: the host of -addr)")
	token := flag.String("token-file", "", "file holding the bearer token (none: no authorization metadata)")
	csrPath := flag.String("csr", "", "PEM file of the PKCS#10 request to send")
	ttl := flag.Int64("ttl", 86400, "the validity asked for, in seconds")
	clusterID := flag.String("cluster-id", "Kubernetes", "the ClusterID metadata (Istio's default)")
	out := flag.String("out", "", "where to write the chain (default: stdout)")
	flag.Parse()
	if *addr == "" || *root == "" || *csrPath == "" {
		fmt.Fprintln(os.Stderr, "caclient: -addr, -root and -csr are required")
		os.Exit(2)
	}
	csr, err := os.ReadFile(*csrPath)
	if err != nil {
		fmt.Fprintf(os.Stderr, "caclient: %v\n", err)
		os.Exit(2)
	}
	opts := &security.Options{
		CAEndpoint:    *addr,
		CAEndpointSAN: *san,
		ClusterID:     *clusterID,
	}
	if *token != "" {
		opts.CredFetcher = tokenFile{*token}
	}
	client, err := citadel.NewCitadelClient(opts, &citadel.TLSOptions{RootCert: *root})
	if err != nil {
		fmt.Fprintf(os.Stderr, "caclient: %v\n", err)
		os.Exit(1)
	}
	defer client.Close()
	chain, err := client.CSRSign(csr, *ttl)
	if err != nil {
		fmt.Fprintf(os.Stderr, "caclient: %v\n", err)
		os.Exit(1)
	}
	var pems strings.Builder
	for _, cert := range chain {
		pems.WriteString(cert)
		if !strings.HasSuffix(cert, "\n") {
			pems.WriteString("\n")
		}
	}
	if *out == "" {
		fmt.Print(pems.String())
		return
	}
	if err := os.WriteFile(*out, []byte(pems.String()), 0o600); err != nil {
		fmt.Fprintf(os.Stderr, "caclient: %v\n", err)
		os.Exit(1)
	}
}
