// Package settings configures Istio's injector as Istio's own injection tests do, for the programs
// of this module that run it beside ours (webhook/, injectbench/): it renders the istio-discovery
// chart from Istio's manifests directory (profile empty, pilot only, as getInjectionSettings in
// pkg/kube/inject's tests), takes the sidecar injector's templates and values and the mesh config
// from it, and builds Istio's webhook (inject.NewWebhook) on a mux from them.
//
// Nothing here talks to a Kubernetes API: the webhook gets a static configuration watcher, a
// fixed mesh config and an empty push context (no ProxyConfig resources), as Istio's
// BenchmarkInjection sets it up.
package settings

import (
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"runtime/debug"
	"syscall"

	meshconfig "istio.io/api/mesh/v1alpha1"
	"istio.io/istio/operator/pkg/render"
	"istio.io/istio/pilot/pkg/features"
	"istio.io/istio/pilot/pkg/model"
	"istio.io/istio/pkg/config/mesh"
	"istio.io/istio/pkg/config/mesh/meshwatcher"
	"istio.io/istio/pkg/kube/inject"
)

// istioModule is the module whose manifests directory holds the charts.
const istioModule = "istio.io/istio"

// Settings is what the injection needs from an installation.
type Settings struct {
	// Config holds the injection templates and policy (ConfigMap istio-sidecar-injector, key config).
	Config *inject.Config
	// Values is the chart's values as the templates see them; RawValues is the same as written
	// in the ConfigMap (what a Watcher hands to the webhook).
	Values    inject.ValuesConfig
	RawValues string
	// Mesh is the default mesh config (ConfigMap istio, key mesh) over Istio's defaults.
	Mesh *meshconfig.MeshConfig
}

// Load renders the chart under manifests with the install values sets (as istioctl's --set) and
// returns the injector's settings from it.
func Load(manifests string, sets []string) (*Settings, error) {
	flags := append([]string{
		"installPackagePath=" + manifests, "profile=empty", "components.pilot.enabled=true",
	}, sets...)
	rendered, _, err := render.GenerateManifest(nil, flags, false, nil, nil)
	if err != nil {
		return nil, fmt.Errorf("rendering the istio-discovery chart: %w", err)
	}
	out := &Settings{}
	for _, set := range rendered {
		for _, object := range set.Manifests {
			if object.GetKind() != "ConfigMap" {
				continue
			}
			data, _ := object.Object["data"].(map[string]any)
			switch object.GetName() {
			case "istio-sidecar-injector":
				raw, _ := data["config"].(string)
				config, err := inject.UnmarshalConfig([]byte(raw))
				if err != nil {
					return nil, fmt.Errorf("the injector's templates: %w", err)
				}
				out.Config = &config
				out.RawValues, _ = data["values"].(string)
				if out.Values, err = inject.NewValuesConfig(out.RawValues); err != nil {
					return nil, fmt.Errorf("the injector's values: %w", err)
				}
			case "istio":
				meshData, _ := data["mesh"].(string)
				if out.Mesh, err = mesh.ApplyMeshConfig(meshData, mesh.DefaultMeshConfig()); err != nil {
					return nil, fmt.Errorf("the mesh config: %w", err)
				}
			}
		}
	}
	if out.Config == nil || out.Mesh == nil {
		return nil, errors.New("the rendered chart has no istio-sidecar-injector or istio ConfigMap")
	}
	return out, nil
}

// Manifests is Istio's manifests directory in the Go module cache, for the version of Istio this
// program was built with (read from its build information, so it always matches the code that
// renders it): $GOMODCACHE, else $GOPATH/pkg/mod, else ~/go/pkg/mod.
func Manifests() (string, error) {
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return "", errors.New("this program has no build information to find Istio's version in")
	}
	version := ""
	for _, dependency := range info.Deps {
		if dependency.Path == istioModule {
			version = dependency.Version
			if dependency.Replace != nil {
				version = dependency.Replace.Version
			}
		}
	}
	if version == "" {
		return "", fmt.Errorf("this program was not built with %s", istioModule)
	}
	cache := os.Getenv("GOMODCACHE")
	if cache == "" {
		gopath := os.Getenv("GOPATH")
		if gopath == "" {
			home, err := os.UserHomeDir()
			if err != nil {
				return "", fmt.Errorf("finding the Go module cache: %w", err)
			}
			gopath = filepath.Join(home, "go")
		}
		cache = filepath.Join(filepath.SplitList(gopath)[0], "pkg", "mod")
	}
	dir := filepath.Join(cache, istioModule+"@"+version, "manifests")
	if _, err := os.Stat(dir); err != nil {
		return "", fmt.Errorf("Istio's manifests are not in the Go module cache (%s): build this "+
			"module's tools again (tests/istio/build.sh), which fetches them: %w", dir, err)
	}
	return dir, nil
}

// staticWatcher hands the webhook one fixed configuration: there is no ConfigMap to watch.
type staticWatcher struct {
	config *inject.Config
	values string
}

func (w staticWatcher) SetHandler(func(*inject.Config, string) error) {}

func (w staticWatcher) Run(<-chan struct{}) {}

func (w staticWatcher) Get() (*inject.Config, string, error) { return w.config, w.values, nil }

// Webhook builds Istio's injection webhook (revision "default") with these settings and registers
// its handler on mux at /inject and /inject/, as istiod does.
//
// It needs ENABLE_NATIVE_SIDECARS=false in the environment before the program starts (Istio reads
// it when its packages are initialised): Istio's default, "auto", looks for the nodes' kubelet
// versions in a Kubernetes API, which these programs do not have. False is also our injector's
// default (no native sidecars unless a pod asks).
func (s *Settings) Webhook(mux *http.ServeMux) (*inject.Webhook, error) {
	if features.EnableNativeSidecars != features.NativeSidecarModeDisabled {
		return nil, errors.New("Istio's webhook is built without a Kubernetes API here: run " +
			"with ENABLE_NATIVE_SIDECARS=false in the environment")
	}
	meshCopy, err := mesh.DeepCopyMeshConfig(s.Mesh)
	if err != nil {
		return nil, err
	}
	environment := &model.Environment{Watcher: meshwatcher.NewTestWatcher(meshCopy)}
	environment.SetPushContext(&model.PushContext{ProxyConfigs: &model.ProxyConfigs{}})
	return inject.NewWebhook(inject.WebhookParameters{
		Watcher:  staticWatcher{config: s.Config, values: s.RawValues},
		Env:      environment,
		Mux:      mux,
		Revision: "default",
	})
}

// NativeSidecarsVariable is the environment variable Istio reads, before main runs, to decide
// whether the proxy is a native sidecar (an init container that keeps running).
const NativeSidecarsVariable = "ENABLE_NATIVE_SIDECARS"

// WithNativeSidecarsSet executes this program again with ENABLE_NATIVE_SIDECARS=false when it is
// unset (ours is false too, and Istio's auto mode would look for nodes in a cluster); it returns
// only when the variable was already set, or with the error when the exec failed.
func WithNativeSidecarsSet() error {
	if _, set := os.LookupEnv(NativeSidecarsVariable); set {
		return nil
	}
	self, err := os.Executable()
	if err != nil {
		return fmt.Errorf("finding this program to run it with %s=false: %w",
			NativeSidecarsVariable, err)
	}
	return syscall.Exec(self, os.Args, append(os.Environ(), NativeSidecarsVariable+"=false"))
}
